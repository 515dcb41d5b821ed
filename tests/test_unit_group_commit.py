"""Catalog group commit: COMMITTEDs that arrive together become one catalog
transaction (one fsync); a row arriving while a batch is being written waits
for it and goes in the next; the agent is told only after its row is durable."""

from bus.clock import FakeClock
from bus.effects import Forward, Send, Submit
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from schemas import decode, encode, make

CHUNK = 64 * 1024
AGENT, NODE = ("agent", b"a-1"), ("node", b"n-1")


class Rig:
    def __init__(self, tmp_path):
        self.clock = FakeClock()
        self.store = CatalogStore(str(tmp_path))
        self.controller = Controller(BrokerConfig(insecure=True, data_dir=str(tmp_path)), self.store, CatalogIndex())
        self.feed(NODE, make("READY", node_id="node-a", window=1 << 30, free_bytes=1 << 40, used_bytes=0))
        self.feed(AGENT, make("HELLO", device_id="office-1"))

    def feed(self, peer, message) -> list:
        frames = encode(message)
        return self.controller.received(peer, decode(frames), frames, self.clock.now())

    def run(self, submit: Submit) -> list:
        return self.controller.completed(submit.key, submit.fn(*submit.args), None, self.clock.now())

    def committing(self, dataset: str) -> str:
        out = self.feed(AGENT, make("OFFER", req=1, dataset=dataset, snapshot="s1", image_size=CHUNK,
                                    chunk_size=CHUNK, chunk_count=1))
        (check,) = [e for e in out if isinstance(e, Submit)]
        (open_,) = [e for e in self.run(check) if isinstance(e, Send) and e.message.t == "OPEN"]
        tid = open_.message["transfer_id"]
        self.feed(NODE, make("OPENED", transfer_id=tid))
        self.feed(AGENT, make("COMMIT", transfer_id=tid, image_blake3=None))
        return tid

    def committed(self, tid: str, dataset: str) -> list:
        return self.feed(NODE, make("COMMITTED", transfer_id=tid, device_id="office-1", dataset=dataset, snapshot="s1",
                                    image_size=CHUNK, chunk_count=1, image_blake3=b"\x07" * 32))


def told_committed(effects) -> list:
    return [decode(e.frames)["transfer_id"] for e in effects if isinstance(e, Forward) and e.t == "COMMITTED"]


def test_commits_that_arrive_together_share_one_catalog_transaction(tmp_path):
    rig = Rig(tmp_path)
    tids = [rig.committing(f"d{i}") for i in range(3)]
    for i, tid in enumerate(tids):
        out = rig.committed(tid, f"d{i}")
        assert not [e for e in out if isinstance(e, Submit)] and not told_committed(out)
    assert rig.controller.next_deadline() == rig.clock.now()  # the loop does not sleep on waiting rows
    (batch,) = [e for e in rig.controller.on_time(rig.clock.now()) if isinstance(e, Submit)]
    assert batch.key == ("records", tuple(tids)) and len(batch.args[0]) == 3
    assert rig.store.lookup("office-1", "d0", "s1") is None  # nobody is told before the row is durable

    late = rig.committing("d3")
    rig.committed(late, "d3")
    assert not [e for e in rig.controller.on_time(rig.clock.now()) if isinstance(e, Submit)]  # waits for the batch

    after = rig.run(batch)
    assert sorted(told_committed(after)) == sorted(tids)
    assert all(rig.store.lookup("office-1", f"d{i}", "s1") is not None for i in range(3))
    (second,) = [e for e in after if isinstance(e, Submit)]
    assert second.key == ("records", (late,))
    assert told_committed(rig.run(second)) == [late]
    assert rig.store.lookup("office-1", "d3", "s1") is not None
    assert [t.state for t in rig.controller.history.finished] == ["committed"] * 4


def test_a_failed_batch_fails_each_of_its_transfers_and_tells_no_one_committed(tmp_path):
    rig = Rig(tmp_path)
    tid = rig.committing("d0")
    rig.committed(tid, "d0")
    (batch,) = [e for e in rig.controller.on_time(rig.clock.now()) if isinstance(e, Submit)]
    out = rig.controller.completed(batch.key, None, OSError(28, "No space left on device"), rig.clock.now())
    assert not told_committed(out)
    errors = [e.message for e in out if isinstance(e, Send) and e.message.t == "ERROR"]
    assert errors and errors[0]["code"] == "internal"
    assert rig.controller.history.finished[-1].state == "failed"
