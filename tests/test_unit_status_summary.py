"""Status at scale, on the controller core (DESIGN.md "Fleet operations —
contract"): the summary's counts follow registrations, drops and every
transfer move; datasets behind the RPO come from the in-memory newest-commit
map (loaded from the catalog at start, moved on each commit); `device_id`
narrows the document; LIST is answered a page at a time, in key order.

A real CatalogStore in tmp_path; catalog work runs at once, in order, as the
catalog pool would run it. No sockets, a FakeClock, a settable wall clock.
"""

from __future__ import annotations

import time

from bus.clock import FakeClock
from bus.effects import Send, Submit
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from schemas import decode, encode, make

CHUNK = 64 * 1024
NODE = ("node", b"node-a")
OPERATOR = ("status", b"operator-1")


class Rig:
    def __init__(self, tmp_path, **config):
        self.clock = FakeClock()
        self.wall = time.time()
        config = {"idle_heartbeat_interval_ms": config.get("heartbeat_interval_ms", 1000), **config}
        self.config = BrokerConfig(insecure=True, data_dir=str(tmp_path / "broker"), **config)
        self.store = CatalogStore(self.config.data_dir)
        self.controller = self.start()
        self.sent: list = []

    def start(self) -> Controller:
        """A controller as the broker builds one: its index loaded from the catalog first."""
        index = CatalogIndex(self.store.placements(), self.store.newest_commits())
        return Controller(self.config, self.store, index, wall_clock=lambda: self.wall)

    def run(self, effects) -> None:
        """Catalog work at once, its answer fed back; what is sent is kept."""
        for effect in effects:
            if isinstance(effect, Submit):
                result = effect.fn(*effect.args)
                self.run(self.controller.completed(effect.key, result, None, self.clock.now()))
            elif isinstance(effect, Send):
                self.sent.append((effect.to, effect.message))

    def send(self, peer, t: str, **fields) -> None:
        """One message, then the rest of its loop turn (on_time: group commit hands its rows over)."""
        frames = encode(make(t, **fields))
        self.run(self.controller.received(peer, decode(frames), frames, self.clock.now()))
        self.run(self.controller.on_time(self.clock.now()))

    def last(self, t: str):
        return next(m for _, m in reversed(self.sent) if m.t == t)

    def summary(self) -> dict:
        return self.controller.status()["summary"]


def agent(i: int) -> tuple:
    return ("agent", f"r{i}".encode())


def test_device_counts_follow_hello_bye_and_silence(tmp_path):
    rig = Rig(tmp_path, heartbeat_interval_ms=1000, heartbeat_liveness=3)
    for i in range(50):
        rig.send(agent(i), "HELLO", device_id=f"dev-{i}")
    rig.send(("agent", b"second"), "HELLO", device_id="dev-0")  # a device on two connections counts once
    assert (rig.summary()["devices_known"], rig.summary()["devices_connected"]) == (50, 50)
    for i in range(10):
        rig.send(agent(i), "BYE")
    # dev-0 still has its second connection
    assert (rig.summary()["devices_known"], rig.summary()["devices_connected"]) == (50, 41)
    # everyone but dev-49 falls silent past liveness
    for _ in range(4):
        rig.clock.advance(1.0)
        rig.send(agent(49), "HEARTBEAT")
        rig.run(rig.controller.on_time(rig.clock.now()))
    assert (rig.summary()["devices_known"], rig.summary()["devices_connected"]) == (50, 1)
    doc = rig.controller.status()
    assert sum(a["connected"] for a in doc["agents"]) == 1 and len(doc["agents"]) == 50


def test_transfers_by_state_follow_every_move_and_commits_move_the_rpo(tmp_path):
    rig = Rig(tmp_path, rpo_target=900)
    rig.send(NODE, "READY", node_id="node-a", window=1 << 20, free_bytes=1 << 40, used_bytes=0)
    rig.send(agent(1), "HELLO", device_id="office-1")
    rig.send(agent(2), "HELLO", device_id="office-2")
    assert rig.summary()["transfers_by_state"] == {}
    assert rig.summary()["datasets"] == 0

    offer = dict(dataset="sql", image_size=CHUNK, chunk_size=CHUNK, chunk_count=1)
    # one offer stays in "checking": its catalog answer is held back
    frames = encode(make("OFFER", req=1, snapshot="s0", **{**offer, "dataset": "files"}))
    held = [e for e in rig.controller.received(agent(2), decode(frames), frames, rig.clock.now())
            if isinstance(e, Submit)]
    assert rig.summary()["transfers_by_state"] == {"checking": 1}

    rig.send(agent(1), "OFFER", req=2, snapshot="s1", **offer)
    tid = rig.last("OPEN")["transfer_id"]
    assert rig.summary()["transfers_by_state"] == {"checking": 1, "opening": 1}
    # placed, never committed: behind
    summary = rig.summary()
    assert (summary["datasets"], summary["datasets_behind"]) == (1, 1)
    assert summary["datasets_behind_oldest"] == [{"device_id": "office-1", "dataset": "sql",
                                                  "newest_committed_at": None}]
    rig.send(NODE, "OPENED", transfer_id=tid)
    assert rig.summary()["transfers_by_state"] == {"checking": 1, "active": 1}
    rig.send(agent(1), "COMMIT", transfer_id=tid, image_blake3=None)
    assert rig.summary()["transfers_by_state"] == {"checking": 1, "committing": 1}
    committed = dict(transfer_id=tid, device_id="office-1", dataset="sql", snapshot="s1", image_size=CHUNK,
                     chunk_count=1, image_blake3=bytes(32))
    frames = encode(make("COMMITTED", **committed))
    record = rig.controller.received(NODE, decode(frames), frames, rig.clock.now())
    assert rig.summary()["transfers_by_state"] == {"checking": 1, "recording": 1}
    rig.run(record)
    rig.run(rig.controller.on_time(rig.clock.now()))  # the turn ends: group commit hands the row over
    assert rig.summary()["transfers_by_state"] == {"checking": 1}
    assert rig.summary()["datasets_behind"] == 0

    rig.run(held)  # the held offer goes on, then its agent aborts it
    assert rig.summary()["transfers_by_state"] == {"opening": 1}
    rig.send(agent(2), "ABORT", transfer_id=rig.last("OPEN")["transfer_id"])
    assert rig.summary()["transfers_by_state"] == {}
    assert rig.summary()["datasets"] == 2  # office-2/files placed, never committed
    assert rig.summary()["datasets_behind"] == 1

    # the RPO passes for office-1/sql: both behind; a restarted controller loads the same from the catalog
    rig.wall += 901
    assert rig.summary()["datasets_behind"] == 2
    rig.controller = rig.start()
    summary = rig.summary()
    assert (summary["datasets"], summary["datasets_behind"]) == (2, 2)
    assert [e["newest_committed_at"] is None for e in summary["datasets_behind_oldest"]] == [True, False]
    assert summary["rpo_target_s"] == 900


def test_parked_offers_are_counted_and_a_lost_node_moves_its_transfers(tmp_path):
    rig = Rig(tmp_path)
    rig.send(agent(1), "HELLO", device_id="office-1")
    rig.send(agent(1), "OFFER", req=1, dataset="sql", snapshot="s1", image_size=CHUNK, chunk_size=CHUNK,
             chunk_count=1)  # no storage node: parked
    assert rig.summary()["transfers_by_state"] == {"parked": 1}
    rig.send(NODE, "READY", node_id="node-a", window=1 << 20, free_bytes=1 << 40, used_bytes=0)
    rig.send(agent(1), "OFFER", req=2, dataset="sql", snapshot="s1", image_size=CHUNK, chunk_size=CHUNK,
             chunk_count=1)
    assert rig.summary()["transfers_by_state"] == {"opening": 1}  # unparked: it is an upload again
    rig.send(NODE, "BYE")
    assert rig.summary()["transfers_by_state"] == {"parked": 1}


def test_status_narrowed_to_one_device_keeps_the_global_summary(tmp_path):
    rig = Rig(tmp_path)
    rig.send(NODE, "READY", node_id="node-a", window=1 << 20, free_bytes=1 << 40, used_bytes=0)
    for i in range(3):
        rig.send(agent(i), "HELLO", device_id=f"dev-{i}")
        rig.send(agent(i), "OFFER", req=1, dataset="sql", snapshot="s1", image_size=CHUNK, chunk_size=CHUNK,
                 chunk_count=1)
    rig.send(OPERATOR, "STATUS", device_id="dev-1")
    doc = rig.last("STATUS_REPLY")["status"]
    assert doc["agents"] == [{"device_id": "dev-1", "connected": True, "stored_bytes": 0, "quota_bytes": None}]
    assert [t["device_id"] for t in doc["transfers"]] == ["dev-1"]
    assert doc["summary"]["devices_known"] == 3 and doc["summary"]["transfers_by_state"] == {"opening": 3}
    rig.send(OPERATOR, "STATUS", device_id="nobody")
    doc = rig.last("STATUS_REPLY")["status"]
    assert doc["agents"] == [] and doc["transfers"] == []


def test_list_is_answered_a_page_at_a_time_in_key_order(tmp_path):
    rig = Rig(tmp_path, list_page_size=3)
    keys = sorted((f"dev-{d}", f"ds-{s}", f"snap-{n}") for d in range(3) for s in range(2) for n in range(2))
    for device, dataset, snapshot in reversed(keys):
        rig.store.record_many([(device, dataset, snapshot, "node-a", 1, 1, bytes(32))])

    def pages(peer, **fields):
        rows, after = [], None
        while True:
            rig.send(peer, "LIST", **fields, **({"after": after} if after else {}))
            reply = rig.last("LIST_REPLY")
            assert len(reply["snapshots"]) <= 3
            rows += [(r["device_id"], r["dataset"], r["snapshot"]) for r in reply["snapshots"]]
            after = reply.get("next")
            if after is None:
                return rows

    assert pages(OPERATOR) == keys
    assert pages(OPERATOR, device_id="dev-1") == [k for k in keys if k[0] == "dev-1"]
    assert pages(OPERATOR, dataset="ds-0") == [k for k in keys if k[1] == "ds-0"]
    assert pages(OPERATOR, device_id="dev-2", dataset="ds-1") == [k for k in keys if k[:2] == ("dev-2", "ds-1")]
    # an agent pages through its own only
    rig.send(agent(1), "HELLO", device_id="dev-0")
    assert pages(agent(1)) == [k for k in keys if k[0] == "dev-0"]
    # a cursor that is not a key is refused
    rig.send(OPERATOR, "LIST", after=["dev-0"])
    assert rig.last("ERROR")["code"] == "bad_field"


def test_no_status_reply_is_unbounded(tmp_path):
    rig = Rig(tmp_path, status_items_max=10)
    for i in range(25):
        rig.send(agent(i), "HELLO", device_id=f"dev-{i}")
    doc = rig.controller.status()
    assert len(doc["agents"]) == 10
    assert doc["summary"]["agents_omitted"] == 15 and doc["summary"]["devices_known"] == 25
    assert doc["summary"]["transfers_omitted"] == 0
