"""AgentCore on a FakeClock against an in-memory broker.

No sockets, no threads: every message the core sends is encoded and decoded
(schemas.encode/decode) on its way to the fake broker, and every reply on
its way back; pool Submits run synchronously, in order, when the test runs
the effects. The test plays the loop: `turn()` is one `on_time(now)`.
"""

from __future__ import annotations

import math
import os
from collections import deque

import blake3
import pytest

from bus.clock import FakeClock
from bus.effects import Send, Submit
from roles.appliance.core import BROKER, AgentCore
from roles.chunkdata import decode_and_verify
from roles.config import AgentConfig, DatasetConfig
from schemas import decode, encode, make

CHUNK = 64 * 1024


class FakeBroker:
    """Broker and storage node in one, answering at once; `silent` swallows everything."""

    def __init__(self):
        self.seen: list = []
        self.silent = False
        self.answer_queries = True
        self.chunks: dict[bytes, bytes] = {}
        self.manifest: list = []
        self.transfers = 0

    def handle(self, msg) -> list:
        self.seen.append(msg)
        if self.silent:
            return []
        if msg.t == "HELLO":
            return [make("WELCOME", heartbeat_interval_ms=1000)]
        if msg.t == "OFFER":
            self.transfers += 1
            self.offer = msg
            tid = f"t{self.transfers}"
            return [make("ACCEPT", req=msg["req"], transfer_id=tid, node_id="node-a", committed=False),
                    make("CREDIT", transfer_id=tid, bytes=64 * 1024 * 1024)]
        if msg.t == "QUERY":
            if not self.answer_queries:
                return []
            self.manifest.extend(msg["hashes"])
            missing = [msg["start"] + i for i, name in enumerate(msg["hashes"])
                       if name is not None and name not in self.chunks]
            return [make("MISSING", transfer_id=msg["transfer_id"], start=msg["start"], count=len(msg["hashes"]),
                         missing=missing)]
        if msg.t == "CHUNK":
            assert "offset" not in msg.fields  # one piece: no bandwidth limit here
            payload = bytes(msg.payload[0])
            self.chunks[msg["hash"]] = decode_and_verify(msg["codec"], payload, msg["raw_len"], msg["hash"])
            return [make("STORED", transfer_id=msg["transfer_id"], hash=msg["hash"], raw_len=msg["raw_len"],
                         wire_len=len(payload))]
        if msg.t == "COMMIT":
            o = self.offer
            return [make("COMMITTED", transfer_id=msg["transfer_id"], device_id="office-1", dataset=o["dataset"],
                         snapshot=o["snapshot"], image_size=o["image_size"], chunk_count=o["chunk_count"],
                         image_blake3=msg["image_blake3"])]
        return []

    def rebuilt(self) -> bytes:
        return b"".join(self.chunks[n] if n is not None else bytes(CHUNK) for n in self.manifest)


class Rig:
    def __init__(self, tmp_path, image: bytes, **overrides):
        data = tmp_path / "fs"
        data.mkdir()
        (data / "s1.img").write_bytes(image)
        self.image = image
        self.clock = FakeClock()
        self.config = AgentConfig(device_id="office-1", state_dir=str(tmp_path / "state"), insecure=True,
                                  datasets=(DatasetConfig(name="fs", path=str(data), chunk_size=CHUNK),),
                                  **overrides)
        os.makedirs(self.config.state_dir, exist_ok=True)
        self.core = AgentCore(self.config, self.clock.now(), clock=self.clock.now, wall_clock=lambda: 1.7e9)
        self.broker = FakeBroker()
        self.to_status: list = []
        self.core.rescan(self.clock.now())

    def run(self, effects) -> None:
        """Carry out effects as the loop would, and everything they lead to."""
        queue = deque(effects)
        while queue:
            effect = queue.popleft()
            now = self.clock.now()
            if isinstance(effect, Submit):
                try:
                    result, error = effect.fn(*effect.args), None
                except Exception as exc:  # as the pool reports it
                    result, error = None, exc
                queue.extend(self.core.completed(effect.key, result, error, now))
            elif isinstance(effect, Send) and effect.to == BROKER:
                for reply in self.broker.handle(decode(encode(effect.message))):
                    queue.extend(self.deliver(reply))
            elif isinstance(effect, Send):
                self.to_status.append((effect.to, decode(encode(effect.message))))
            else:
                raise AssertionError(f"unexpected effect {effect!r}")

    def deliver(self, message) -> list:
        frames = encode(message)
        return self.core.received(BROKER, decode(frames), frames, self.clock.now())

    def connect(self) -> None:
        self.run([Send(BROKER, self.core.register_message(self.clock.now(), endpoint="inproc://broker"))])

    def turn(self) -> None:
        self.run(self.core.on_time(self.clock.now()))

    def turns(self, until, limit: int = 200) -> None:
        for _ in range(limit):
            if until():
                return
            self.turn()
        raise AssertionError("condition not reached")

    def sent(self, t: str) -> list:
        return [m for m in self.broker.seen if m.t == t]

    def result(self) -> dict:
        return self.core.outcomes.results[("fs", "s1")]


def image_of(chunks: int) -> bytes:
    rng = __import__("random").Random(7)
    parts = [bytes(CHUNK) if i == 2 else rng.randbytes(CHUNK) for i in range(chunks)]
    return b"".join(parts)


def test_offered_only_after_welcome_then_committed_bytes_equal_the_image(tmp_path):
    rig = Rig(tmp_path, image_of(20))
    rig.turn()
    assert rig.broker.seen == [] and not rig.core.active  # not welcomed: nothing offered
    rig.connect()
    assert [m.t for m in rig.broker.seen] == ["HELLO"] and rig.core.welcomed
    rig.turns(lambda: rig.core.done)
    assert [m.t for m in rig.broker.seen][:2] == ["HELLO", "OFFER"]
    assert rig.result()["state"] == "committed"
    assert rig.broker.rebuilt() == rig.image
    assert rig.sent("COMMIT")[0]["image_blake3"] == blake3.blake3(rig.image).digest()
    assert rig.result()["chunks_sent"] == 19  # the zero chunk never travels
    stats = rig.core.statistics()
    assert (stats.active, stats.queued, stats.in_flight) == (0, 0, 0)


def test_lost_link_parks_the_active_upload_and_it_is_offered_again_after_reconnect(tmp_path):
    rig = Rig(tmp_path, image_of(8))
    rig.broker.answer_queries = False
    rig.connect()
    rig.turn()
    assert len(rig.sent("OFFER")) == 1 and rig.core.active
    rig.run(rig.core.on_link("lost", rig.clock.now()))
    assert not rig.core.active and not rig.core.welcomed
    assert rig.result()["state"] == "parked" and rig.result()["reason"] == "broker connection lost"
    rig.turn()
    assert len(rig.sent("OFFER")) == 1  # no broker: nothing offered
    rig.broker.answer_queries = True
    rig.run(rig.core.on_link("connected", rig.clock.now()))
    rig.connect()
    rig.turn()
    assert len(rig.sent("OFFER")) == 1  # parked: offered again after its retry delay
    retry_at = rig.core.deadlines.due_at(("retry", ("fs", "s1")))
    assert retry_at == pytest.approx(rig.clock.now() + 2.0)
    rig.clock.jump(retry_at)
    rig.turns(lambda: rig.core.done)
    offers = rig.sent("OFFER")
    assert len(offers) == 2 and offers[1]["snapshot"] == "s1"
    assert rig.result()["state"] == "committed" and rig.broker.rebuilt() == rig.image


def test_reply_watchdog_parks_a_silent_upload_after_exactly_reply_timeout(tmp_path):
    rig = Rig(tmp_path, image_of(8), reply_timeout_ms=5000)
    rig.broker.answer_queries = False
    rig.connect()
    rig.turn()
    accepted_at = rig.clock.now()  # ACCEPT and CREDIT were the cloud's last words
    assert rig.core.active
    assert rig.core.deadlines.due_at(("reply", 1)) == math.nextafter(accepted_at + 5.0, math.inf)
    rig.clock.jump(accepted_at + 5.0)
    rig.turn()
    assert rig.core.active and not rig.sent("ABORT")
    rig.clock.jump(math.nextafter(accepted_at + 5.0, math.inf))
    rig.turn()
    assert not rig.core.active
    assert [m["transfer_id"] for m in rig.sent("ABORT")] == ["t1"]
    assert rig.result()["state"] == "parked"
    assert rig.result()["reason"] == "no answer from the cloud for 5s"


def test_a_reply_heard_moves_the_watchdog_on(tmp_path):
    rig = Rig(tmp_path, image_of(8), reply_timeout_ms=5000)
    rig.broker.answer_queries = False
    rig.connect()
    rig.turn()
    start = rig.clock.now()
    rig.clock.jump(start + 4.0)
    rig.run(rig.deliver(make("CREDIT", transfer_id="t1", bytes=1)))
    rig.clock.jump(start + 5.5)
    rig.turn()
    assert rig.core.active  # heard at +4: silent only from +9
    rig.clock.jump(start + 9.001)
    rig.turn()
    assert not rig.core.active and rig.result()["state"] == "parked"


@pytest.mark.parametrize("violation", [
    make("STORED", transfer_id="t1", hash=b"\x01" * 32, raw_len=CHUNK, wire_len=100),
    make("COMMITTED", transfer_id="t1", device_id="office-1", dataset="fs", snapshot="s1", image_size=8 * CHUNK,
         chunk_count=8, image_blake3=b"\x02" * 32),
    make("ACCEPT", req=1, transfer_id="t1", node_id="node-a", committed=False),
], ids=["stored-never-sent", "committed-while-sending", "accept-twice"])
def test_a_protocol_violation_fails_the_upload_and_aborts_it(tmp_path, violation):
    rig = Rig(tmp_path, image_of(8))
    rig.broker.answer_queries = False
    rig.connect()
    rig.turn()
    assert rig.core.active[1].state == "sending"
    rig.run(rig.deliver(violation))
    assert not rig.core.active
    assert rig.result()["state"] == "failed"
    assert rig.result()["reason"].startswith("bad_state: ")
    assert [m["transfer_id"] for m in rig.sent("ABORT")] == ["t1"]


def test_status_socket_answers_status_and_refuses_other_types(tmp_path):
    rig = Rig(tmp_path, image_of(4))
    rig.connect()
    peer = ("status", b"client-1")
    rig.run(rig.core.received(peer, make("STATUS"), [], rig.clock.now()))
    rig.run(rig.core.received(peer, make("HEARTBEAT"), [], rig.clock.now()))
    (to1, reply), (to2, refusal) = rig.to_status
    assert to1 == to2 == peer
    assert reply.t == "STATUS_REPLY"
    doc = reply["status"]
    assert list(doc) == ["device_id", "broker", "connected", "bandwidth", "wire", "datasets", "transfers"]
    assert (doc["broker"], doc["connected"]) == ("inproc://broker", True)
    assert refusal.t == "ERROR" and refusal["code"] == "unknown_type"
