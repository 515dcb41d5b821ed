"""The three real cores, AgentCore + Controller + StorageCore, joined on a
FakeClock by an in-memory router that encodes and decodes every hop.

No sockets and no threads: the router plays the loops. Every Send and
Forward goes through schemas.encode/decode on its way; pool work (the
catalog, the node's store and image pools, the agent's work and image
pools) runs in submission order when the router gets to it, and its result
comes back through `completed()`. DEALER links are played as DealerLink
plays them: a HEARTBEAT from a core whose link has been idle an interval.
After every step the router checks the credit invariant of every node.
"""

from __future__ import annotations

import os
import random
from collections import deque
from pathlib import Path

import blake3
import pytest

from bus.clock import FakeClock
from bus.effects import Forward, Send, Submit
from roles.appliance.core import AgentCore
from roles.appliance.restore import ImageWriter
from roles.config import AgentConfig, BrokerConfig, DatasetConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.core import StorageCore
from roles.storenode.manifests import ManifestStore
from roles.storenode.ownership import DeviceChunks
from schemas import decode, encode, make

CHUNK = 64 * 1024
AGENT, NODE, RESTORER = ("agent", b"agent-1"), ("node", b"node-a"), ("agent", b"restore-1")
BROKER = ("broker", None)
INTERVAL_S, LIVENESS = 1.0, 3


def image_of(chunks: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(bytes(CHUNK) if i % 7 == 3 else rng.randbytes(CHUNK) for i in range(chunks))


class RestoreClient:
    """The restore command's logic: RESTORE, then IMAGE and BLOCKs into an ImageWriter, CREDIT back."""

    def __init__(self, out: Path):
        self.writer = ImageWriter(out)
        self.transfer_id = None
        self.errors: list = []
        self.done = False

    def handle(self, msg) -> list:
        out = []
        if msg.t == "ACCEPT":
            self.transfer_id = msg["transfer_id"]
        elif msg.t == "IMAGE":
            self.writer.on_image(msg["image_size"], msg["chunk_size"], msg["chunk_count"], msg["image_blake3"])
        elif msg.t == "BLOCK":
            credit = self.writer.on_block(msg["index"], msg["hash"], msg["raw_len"], msg["codec"],
                                          msg.payload[0] if msg.payload else None)
            if credit:
                out.append(make("CREDIT", transfer_id=self.transfer_id, bytes=credit))
        elif msg.t == "ERROR":
            self.errors.append(msg)
        if self.writer.complete and not self.done:
            self.writer.finish()
            self.done = True
        return out


class Router:
    def __init__(self, tmp_path: Path, images: dict, *, node_window: int = 4 * CHUNK, max_active: int = 2,
                 transfer_window: int = 64 * 1024, **broker):
        self.clock = FakeClock()
        now = self.clock.now()
        self.images = images
        datasets = []
        for name, image in images.items():
            folder = tmp_path / "snapshots" / name
            folder.mkdir(parents=True)
            (folder / "s1.img").write_bytes(image)
            datasets.append(DatasetConfig(name=name, path=str(folder), chunk_size=CHUNK))
        self.broker_config = BrokerConfig(insecure=True, data_dir=str(tmp_path / "broker"),
                                          heartbeat_interval_ms=int(INTERVAL_S * 1000),
                                          heartbeat_liveness=LIVENESS, transfer_window=transfer_window, **broker)
        self.store = CatalogStore(self.broker_config.data_dir)
        self.controller = Controller(self.broker_config, self.store, CatalogIndex(self.store.placements()))
        root = tmp_path / "node-a"
        self.chunks = ChunkStore(root)
        self.manifests = ManifestStore(root)
        owners = DeviceChunks(root, committed_chunks=lambda d: (
            n for m in self.manifests.all_for_device(d) for n in m.chunks))
        self.node = StorageCore("node-a", node_window, self.chunks, self.manifests, owners,
                                heartbeat_interval_s=INTERVAL_S, space=(1 << 40, 0), now=now)
        config = AgentConfig(device_id="office-1", state_dir=str(tmp_path / "state"), insecure=True,
                             datasets=tuple(datasets), max_active_transfers=max_active, limit=None,
                             heartbeat_interval_ms=int(INTERVAL_S * 1000))
        os.makedirs(config.state_dir, exist_ok=True)
        self.agent = AgentCore(config, now, clock=self.clock.now, wall_clock=lambda: 1.7e9, once=True)
        self.restorer: RestoreClient | None = None
        self.queue: deque = deque()  # (owner, effect) in the order they were made
        self.silent: set = set()  # parties whose messages are lost (and who send no heartbeat)
        self.last_sent = {"agent": now, "node": now}
        self.steps = 0
        self.agent.rescan(now)
        self.take("node", [Send(BROKER, self.node.register_message(now))])
        self.take("agent", [Send(BROKER, self.agent.register_message(now, endpoint="inproc://broker"))])

    # --- the router -------------------------------------------------------------------

    def take(self, owner: str, effects) -> None:
        for effect in effects:
            self.queue.append((owner, effect))

    def step(self) -> None:
        owner, effect = self.queue.popleft()
        now = self.clock.now()
        self.steps += 1
        if isinstance(effect, Submit):
            core = self.core_of(owner)
            try:
                result, error = effect.fn(*effect.args), None
            except Exception as exc:  # as TaskPool reports it
                result, error = None, exc
            self.take(owner, core.completed(effect.key, result, error, now))
        elif owner in ("agent", "node", "restorer"):
            self.from_dealer(owner, effect, now)
        else:
            self.from_broker(effect, now)
        self.check_credit()

    def core_of(self, owner: str):
        return {"agent": self.agent, "node": self.node, "broker": self.controller}[owner]

    def from_dealer(self, owner: str, effect, now: float) -> None:
        assert isinstance(effect, Send) and effect.to == BROKER, effect
        if owner in self.silent:
            return
        self.last_sent[owner] = now
        frames = encode(effect.message)
        peer = {"agent": AGENT, "node": NODE, "restorer": RESTORER}[owner]
        self.take("broker", self.controller.received(peer, decode(frames), frames, now))

    def from_broker(self, effect, now: float) -> None:
        assert isinstance(effect, (Send, Forward)), effect
        frames = encode(effect.message) if isinstance(effect, Send) else effect.frames
        msg = decode(frames)
        if effect.to == AGENT:
            self.take("agent", self.agent.received(BROKER, msg, frames, now))
        elif effect.to == NODE:
            if "node" not in self.silent:
                self.take("node", self.node.received(BROKER, msg, frames, now))
        elif effect.to == RESTORER:
            self.take("restorer", [Send(BROKER, m) for m in self.restorer.handle(msg)])
        else:
            raise AssertionError(f"to nobody: {effect!r}")

    def next_due(self) -> float:
        dues = [d for d in (self.agent.next_deadline(), self.node.next_deadline(),
                            self.controller.next_deadline()) if d is not None]
        dues += [last + INTERVAL_S for party, last in self.last_sent.items() if party not in self.silent]
        return min(dues)

    def tick(self, to: float | None = None) -> None:
        """Nothing queued: move the clock to the earliest deadline (or `to`) and let each core act."""
        self.clock.jump(max(self.clock.now(), self.next_due() if to is None else to))
        now = self.clock.now()
        for owner in ("broker", "node", "agent"):
            self.take(owner, self.core_of(owner).on_time(now))
        for party, core in (("agent", self.agent), ("node", self.node)):
            if party not in self.silent and now - self.last_sent[party] >= INTERVAL_S:
                self.take(party, [Send(BROKER, core.heartbeat_message(now))])

    def run_until(self, condition, limit: int = 200_000) -> None:
        for _ in range(limit):
            if condition():
                return
            if self.queue:
                self.step()
            else:
                self.tick()
        raise AssertionError("condition not reached")

    def settle(self) -> None:
        while self.queue:
            self.step()

    def check_credit(self) -> None:
        for node_id, credit in self.controller.credit.nodes.items():
            held = sum(t.ledger.holding + t.ledger.in_flight_bytes for t in self.controller.transfers.values()
                       if t.kind == "upload" and t.node_id == node_id)
            assert held == credit.pool.outstanding <= credit.pool.window, (self.steps, held, credit.pool)

    # --- what the tests look at ------------------------------------------------------------

    def result(self, dataset: str) -> dict | None:
        return self.agent.outcomes.results.get((dataset, "s1"))

    def agent_state(self, dataset: str) -> str | None:
        r = self.result(dataset)
        return r and r["state"]

    def broker_transfer(self, dataset: str, states=None):
        for t in list(self.controller.transfers.values()) + list(self.controller.history.finished):
            if t.dataset == dataset and t.kind == "upload" and (states is None or t.state in states):
                return t
        return None

    def rebuilt(self, dataset: str) -> bytes:
        manifest = self.manifests.load("office-1", dataset, "s1")
        return b"".join(self.chunks.read_raw(n) if n is not None else bytes(manifest.chunk_len(i))
                        for i, n in enumerate(manifest.chunks))


def test_snapshots_commit_with_the_bytes_of_their_images_and_restore(tmp_path):
    images = {"fs": image_of(40, 1), "sql": image_of(23, 2)}
    router = Router(tmp_path, images)
    router.run_until(lambda: router.agent.done)
    for name, image in images.items():
        assert router.agent_state(name) == "committed"
        assert router.rebuilt(name) == image
        assert router.store.lookup("office-1", name, "s1")["blake3"] == blake3.blake3(image).hexdigest()
        assert router.broker_transfer(name, {"committed"}) is not None
    sent = sum(router.result(n)["chunks_sent"] for n in images)
    assert sent == sum(1 for i in range(40) if i % 7 != 3) + sum(1 for i in range(23) if i % 7 != 3)

    out = tmp_path / "restored.img"
    router.restorer = RestoreClient(out)
    router.take("restorer", [Send(BROKER, make("HELLO", device_id="office-1")),
                             Send(BROKER, make("RESTORE", req=1, dataset="fs", snapshot="s1", window=3 * CHUNK))])
    router.run_until(lambda: router.restorer.done or router.restorer.errors)
    assert not router.restorer.errors
    assert out.read_bytes() == images["fs"]
    # credit for the last blocks arrives after the restore ended: legal, and no error anywhere
    errors_before = dict(router.controller.errors_by_code)
    router.take("restorer", [Send(BROKER, make("CREDIT", transfer_id=router.restorer.transfer_id, bytes=CHUNK))])
    router.settle()
    assert dict(router.controller.errors_by_code) == errors_before
    assert [t.state for t in router.controller.history.finished if t.kind == "restore"] == ["restored"]


def test_a_silent_node_parks_its_transfers_after_exactly_heartbeat_liveness_intervals(tmp_path):
    router = Router(tmp_path, {"fs": image_of(64, 3)}, max_active=1)
    router.run_until(lambda: (t := router.broker_transfer("fs", {"active"})) is not None and t.ledger.in_flight)
    router.settle()
    session = router.controller.registry.nodes_by_id["node-a"]
    router.silent.add("node")
    last_heard = session.last_heard
    death = last_heard + LIVENESS * INTERVAL_S
    while router.next_due() < death:  # everything else goes on meanwhile: the agent heartbeats, and waits
        router.tick()
        router.settle()
    router.tick(to=death - 1e-6)
    router.settle()
    assert router.broker_transfer("fs", {"active"}) is not None, "parked before liveness ran out"
    router.tick(to=death)
    router.settle()
    parked = router.controller.history.parked.get(("office-1", "fs", "s1"))
    assert parked is not None and parked.reason.startswith("node_unavailable")
    assert "node-a" in router.controller.registry.lost_nodes
    assert router.agent_state("fs") == "parked"


def test_a_reoffer_aborts_the_stale_upload_on_the_broker_and_the_node(tmp_path):
    router = Router(tmp_path, {"fs": image_of(64, 4)}, max_active=1)
    router.run_until(lambda: router.broker_transfer("fs", {"active"}) is not None)
    router.settle()
    stale = router.broker_transfer("fs", {"active"})
    assert stale.transfer_id in router.node.uploads
    router.take("agent", [Send(BROKER, make("OFFER", req=99, dataset="fs", snapshot="s1", image_size=64 * CHUNK,
                                            chunk_size=CHUNK, chunk_count=64))])
    router.settle()
    assert stale.state == "aborted" and stale.reason == "offered again"
    assert stale.transfer_id not in router.node.uploads
    assert stale.transfer_id not in router.controller.transfers
    fresh = router.controller.uploads_by_key[("office-1", "fs", "s1")]
    assert fresh.transfer_id != stale.transfer_id and fresh.state == "active"


def test_a_protocol_violation_puts_the_transfer_in_error_on_both_sides(tmp_path):
    router = Router(tmp_path, {"fs": image_of(64, 5)}, max_active=1)
    router.run_until(lambda: router.broker_transfer("fs", {"active"}) is not None)
    router.settle()
    t = router.broker_transfer("fs", {"active"})
    # the node claims a commit the agent never asked for: COMMITTED is not allowed in `active`
    router.take("node", [Send(BROKER, make("COMMITTED", transfer_id=t.transfer_id, device_id="office-1",
                                           dataset="fs", snapshot="s1", image_size=64 * CHUNK, chunk_count=64,
                                           image_blake3=b"\x01" * 32))])
    router.settle()
    assert t.state == "error" and "COMMITTED not allowed" in t.reason and "node-a" in t.reason
    assert router.controller.errors_by_code["bad_state"] == 1
    assert router.agent_state("fs") == "failed"
    assert router.result("fs")["reason"].startswith("bad_state")
    assert t.transfer_id not in router.node.uploads  # the broker's ABORT closed it on the node
    assert router.store.lookup("office-1", "fs", "s1") is None


@pytest.mark.parametrize("seed", [11, 12])
def test_credit_is_shared_within_a_small_node_window_under_contention(tmp_path, seed):
    images = {"a": image_of(30, seed), "b": image_of(30, seed + 100)}
    router = Router(tmp_path, images, node_window=2 * CHUNK + 2048, max_active=2)
    router.run_until(lambda: router.agent.done)
    for name, image in images.items():
        assert router.agent_state(name) == "committed" and router.rebuilt(name) == image
    assert all(c.pool.outstanding == 0 for c in router.controller.credit.nodes.values())


# --- quotas: usage is what STORED acknowledged for the device (roles/controller/quota.py) ----------------


def test_usage_is_the_bytes_stored_for_the_device_once_per_chunk(tmp_path):
    """Two datasets of one image: each distinct chunk is stored, and charged, once; zeros cost nothing."""
    image = image_of(40, 31)
    router = Router(tmp_path, {"fs": image, "copy": image})
    router.run_until(lambda: router.agent.done)
    assert router.agent_state("fs") == router.agent_state("copy") == "committed"
    usage = router.controller.quotas.usage["office-1"]
    assert usage == sum(router.result(n)["bytes_sent"] for n in ("fs", "copy")) == router.node.stored_bytes
    distinct = len({image[i:i + CHUNK] for i in range(0, len(image), CHUNK)} - {bytes(CHUNK)})
    assert distinct * CHUNK // 2 < usage <= distinct * (CHUNK + 64)
    router.tick(to=router.clock.now() + 2)
    router.settle()
    assert router.store.usage() == {"office-1": usage}


def test_a_device_past_its_quota_is_interrupted_then_refused_and_its_usage_survives_a_restart(tmp_path):
    from bus.errors import RequestError
    from roles.quotarules import parse_quota

    quota = 10 * CHUNK
    router = Router(tmp_path, {"fs": image_of(40, 32)}, max_active=1, quota=parse_quota({"office-*": quota}))
    router.run_until(lambda: router.agent.done)
    assert router.agent_state("fs") == "failed"
    assert router.result("fs")["reason"].startswith("quota_exceeded"), router.result("fs")
    usage = router.controller.quotas.usage["office-1"]
    window = max(64 * 1024, 2 * CHUNK + 65536)  # one upload's credit window (agentside.agent_OFFER)
    assert quota < usage <= quota + window + CHUNK  # stopped at the STORED that passed it
    # the upload was interrupted at a STORED (it parked with what it had stored), then each offer refused
    parked = router.controller.history.parked[("office-1", "fs", "s1")]
    assert parked.reason.startswith("quota_exceeded") and parked.bytes_done > quota, parked
    assert router.controller.errors_by_code["quota_exceeded"] == 4  # the interruption, then 3 offers again
    assert not router.node.uploads, "the node still holds the interrupted upload"
    assert router.store.lookup("office-1", "fs", "s1") is None

    router.tick(to=router.clock.now() + 2)  # the usage is saved within a second
    router.settle()
    assert router.store.usage() == {"office-1": usage}
    restarted = Controller(router.broker_config, router.store, CatalogIndex(router.store.placements()),
                           usage=router.store.usage())
    with pytest.raises(RequestError) as refusal:
        restarted.quotas.admit_offer("office-1")
    assert refusal.value.code == "quota_exceeded"
    restarted.quotas.admit_offer("other-1")  # no pattern matches it: unlimited
