"""The broker's stall watchdog (roles/controller/core.py watch_stall): an upload is parked
`stalled` after stall_timeout_ms without acknowledged progress. Progress is new
ground (a QUERY slice past those answered, a chunk STORED, the commit), never
a slice asked again; and time spent waiting for the node's credit is the
broker's doing, not the upload's silence.

The Controller alone, on a hand-driven clock: the test plays the agent and the
node, so each message and each second is the test's choice.
"""

from __future__ import annotations

import os

import pytest

from bus.effects import Forward, Send, Submit
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from schemas import decode, encode, make

CHUNK = 64 * 1024
STALL_S = 5.0
NODE = ("node", b"node-a")


class Broker:
    def __init__(self, tmp_path, node_window: int, **config):
        config = BrokerConfig(insecure=True, data_dir=str(tmp_path / "broker"), stall_timeout_ms=int(STALL_S * 1000),
                              heartbeat_interval_ms=60_000, **config)
        os.makedirs(config.data_dir, exist_ok=True)
        store = CatalogStore(config.data_dir)
        self.core = Controller(config, store, CatalogIndex(store.placements()))
        self.now = 0.0
        self.sent: list = []  # (peer, message)
        self.node_says(make("READY", node_id="node-a", window=node_window, free_bytes=1 << 40, used_bytes=0))

    def run(self, effects) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, Submit):
                try:
                    result, error = effect.fn(*effect.args), None
                except Exception as exc:
                    result, error = None, exc
                queue += self.core.completed(effect.key, result, error, self.now)
            elif isinstance(effect, Send):
                self.sent.append((effect.to, decode(encode(effect.message))))
            elif isinstance(effect, Forward):
                self.sent.append((effect.to, decode(effect.frames)))

    def says(self, peer, message) -> None:
        frames = encode(message)
        self.run(self.core.received(peer, decode(frames), frames, self.now))

    def node_says(self, message) -> None:
        self.says(NODE, message)

    def at(self, now: float) -> None:
        """The clock moves to `now`; every deadline due by then runs (heartbeats are the test's)."""
        while (due := self.core.next_deadline()) is not None and due <= now:
            self.now = max(self.now, due)
            self.run(self.core.on_time(self.now))
        self.now = now
        self.run(self.core.on_time(now))

    def to(self, peer, t: str) -> list:
        return [m for p, m in self.sent if p == peer and m.t == t]

    def upload(self, device: str, chunks: int) -> str:
        """HELLO and OFFER from `device`, OPENED by the node: the transfer id, now `active`."""
        agent = ("agent", device.encode())
        self.says(agent, make("HELLO", device_id=device))
        self.says(agent, make("OFFER", req=1, dataset="fs", snapshot="s1", image_size=chunks * CHUNK,
                              chunk_size=CHUNK, chunk_count=chunks))
        opened = [m for m in self.to(NODE, "OPEN") if m["device_id"] == device]
        assert opened, self.sent
        tid = opened[-1]["transfer_id"]
        self.node_says(make("OPENED", transfer_id=tid))
        assert self.core.transfers[tid].state == "active"
        return tid

    def slice_answered(self, device: str, tid: str, start: int, missing: list) -> None:
        """The agent's QUERY of one chunk name at `start`, and the node's MISSING for it."""
        self.says(("agent", device.encode()), make("QUERY", transfer_id=tid, start=start, hashes=[bytes([start]) * 32]))
        self.node_says(make("MISSING", transfer_id=tid, start=start, count=1, missing=missing))

    def state(self, tid: str) -> str:
        t = self.core.transfers.get(tid)
        if t is not None:
            return t.state
        ended = [*self.core.history.finished, *self.core.history.parked.values()]
        return next(f.state for f in ended if f.transfer_id == tid)


@pytest.fixture
def broker(tmp_path):
    return Broker(tmp_path, node_window=64 * CHUNK)


def test_slices_past_those_answered_are_progress(broker):
    tid = broker.upload("office-1", chunks=8)
    for second, start in enumerate(range(8), start=1):
        broker.at(second * (STALL_S - 1))  # each new slice well within the stall timeout of the last
        broker.slice_answered("office-1", tid, start, missing=[])
    assert broker.state(tid) == "active"
    assert broker.core.transfers[tid].bytes_done == 8 * CHUNK


def test_a_slice_asked_again_is_not_progress(broker):
    tid = broker.upload("office-1", chunks=8)
    broker.at(1.0)
    broker.slice_answered("office-1", tid, 0, missing=[])
    for second in range(2, 7):  # the same slice every second: answered, forwarded, but no new ground
        broker.at(float(second))
        if broker.state(tid) != "active":
            break
        broker.slice_answered("office-1", tid, 0, missing=[])
        assert broker.core.transfers[tid].bytes_done == CHUNK, "a slice asked again counted twice"
    broker.at(1.0 + STALL_S + 0.01)
    assert broker.state(tid) == "parked"
    assert [e["code"] for e in broker.to(("agent", b"office-1"), "ERROR")] == ["stalled"]


def test_waiting_for_the_nodes_credit_is_not_silence_and_the_clock_starts_at_the_grant(tmp_path):
    broker = Broker(tmp_path, node_window=CHUNK + 2048)  # one chunk in flight on the whole node
    hog = broker.upload("office-1", chunks=4)
    broker.slice_answered("office-1", hog, 0, missing=[0])  # granted the node's whole window, never spent
    assert broker.to(("agent", b"office-1"), "CREDIT")
    waiter = broker.upload("office-2", chunks=4)
    broker.at(0.5)
    broker.slice_answered("office-2", waiter, 0, missing=[0])
    assert broker.core.credit.is_waiting("node-a", waiter, "office-2")
    assert not broker.to(("agent", b"office-2"), "CREDIT")

    broker.at(STALL_S + 0.01)  # the hog's silence ran out; the waiter was waiting on the broker
    assert broker.state(hog) == "parked"
    assert broker.state(waiter) == "active"
    granted_at = STALL_S  # the hog's last progress was at 0: parked, and its credit granted, at 5 s
    assert broker.to(("agent", b"office-2"), "CREDIT"), "the hog's credit went to the waiter"
    broker.at(granted_at + STALL_S - 0.1)
    assert broker.state(waiter) == "active", "stalled for time it spent waiting for credit"
    broker.at(granted_at + STALL_S + 0.1)  # granted, then silent: now it is the upload's silence
    assert broker.state(waiter) == "parked"
