"""Catalog group commit: COMMITTEDs that arrive together become one catalog
transaction (one fsync); a row arriving while a batch is being written waits
for it and goes in the next; the agent is told only after its row is durable.

A catalog that cannot write (a full disk: a real SQLITE_FULL error) holds
its rows, un-acknowledged, and tries them again with back-off; OFFERs are
refused `catalog_unavailable` meanwhile, a failing read is answered with it,
status says why, and everything goes on by itself once a write succeeds
(issue 11, "errors park, never kill"). tests/test_e2e_broker_disk.py does it
on a real full filesystem.
"""

import sqlite3

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

    def fail(self, submit: Submit, error: BaseException) -> list:
        return self.controller.completed(submit.key, None, error, self.clock.now())

    def due(self) -> list:
        """The catalog work handed out first, waking the controller at each of its deadlines
        (heartbeats fall due meanwhile) as the loop does."""
        for _ in range(100):
            self.clock.jump(max(self.clock.now(), self.controller.next_deadline()))
            handed = submits(self.controller.on_time(self.clock.now()))
            if handed:
                return handed
        raise AssertionError("no catalog work within 100 wake-ups")

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
    """An error that is not the disk's (a bug) ends the request: told `internal`, never COMMITTED."""
    rig = Rig(tmp_path)
    tid = rig.committing("d0")
    rig.committed(tid, "d0")
    (batch,) = [e for e in rig.controller.on_time(rig.clock.now()) if isinstance(e, Submit)]
    out = rig.fail(batch, sqlite3.InterfaceError("Error binding parameter 1"))
    assert not told_committed(out)
    errors = [e.message for e in out if isinstance(e, Send) and e.message.t == "ERROR"]
    assert errors and errors[0]["code"] == "internal"
    assert rig.controller.history.finished[-1].state == "failed"
    assert rig.controller.status()["broker"]["catalog"]["available"]


# --- a catalog that cannot write ------------------------------------------------------------------


def sqlite_full() -> sqlite3.OperationalError:
    """A real SQLITE_FULL, as a full data_dir raises it (the database is capped at two pages)."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 2")
    try:
        db.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        return exc
    raise AssertionError("max_page_count did not fill the database")


def submits(effects) -> list:
    return [e for e in effects if isinstance(e, Submit)]


def errors_sent(effects) -> list:
    return [e.message for e in effects if isinstance(e, Send) and e.message.t == "ERROR"]


def offer(rig, dataset: str, snapshot: str = "s1") -> list:
    return rig.feed(AGENT, make("OFFER", req=7, dataset=dataset, snapshot=snapshot, image_size=CHUNK,
                                chunk_size=CHUNK, chunk_count=1))


def test_a_full_catalog_holds_the_rows_unacknowledged_and_records_them_when_space_is_back(tmp_path):
    rig = Rig(tmp_path)
    controller = rig.controller
    *tids, late = [rig.committing(f"d{i}") for i in range(3)]
    for i, tid in enumerate(tids):
        rig.committed(tid, f"d{i}")
    (batch,) = rig.due()
    out = rig.fail(batch, sqlite_full())
    assert not told_committed(out) and not errors_sent(out), out  # held: nobody told anything
    assert [controller.transfers[t].state for t in tids] == ["recording", "recording"]
    assert controller.transfers[tids[0]].reason.startswith("catalog_unavailable: SQLITE_FULL: database or disk is full")
    catalog = controller.status()["broker"]["catalog"]
    assert catalog["available"] is False and catalog["reason"] == "SQLITE_FULL: database or disk is full", catalog
    assert catalog["rows_waiting"] == 2
    tried = [rig.clock.now()]

    # tried again with back-off (0.5 s, then 1 s), the same rows and one that came meanwhile, in one batch
    rig.committed(late, "d2")
    assert not submits(controller.on_time(rig.clock.now()))
    (again,) = rig.due()
    tried.append(rig.clock.now())
    assert again.key == ("records", (*tids, late))
    rig.fail(again, sqlite_full())
    (third,) = rig.due()
    tried.append(rig.clock.now())
    assert [round(b - a, 3) for a, b in zip(tried, tried[1:])] == [0.5, 1.0]
    assert all(rig.store.lookup("office-1", f"d{i}", "s1") is None for i in range(3))

    out = rig.run(third)  # space is back
    assert sorted(told_committed(out)) == sorted([*tids, late])
    assert all(rig.store.lookup("office-1", f"d{i}", "s1") is not None for i in range(3))
    assert controller.status()["broker"]["catalog"] == {"available": True, "reason": None, "outages": 1,
                                                        "rows_waiting": 0}
    assert [t.state for t in controller.history.finished] == ["committed"] * 3
    assert controller.catalog_due() is None


def test_while_the_catalog_is_unavailable_offers_are_refused_and_failing_reads_are_answered_with_it(tmp_path):
    rig = Rig(tmp_path)
    controller = rig.controller
    tid = rig.committing("d0")
    rig.committed(tid, "d0")
    rig.fail(rig.due()[0], sqlite_full())

    out = offer(rig, "other")
    (error,) = errors_sent(out)
    assert error["code"] == "catalog_unavailable" and "SQLITE_FULL" in error["reason"] and error["req"] == 7
    assert not submits(out) and len(controller.transfers) == 1  # nothing made for it

    # reads are still asked (a full disk usually serves them); one that fails is answered with the code
    (listing,) = submits(rig.feed(AGENT, make("LIST")))
    (error,) = errors_sent(rig.fail(listing, sqlite3.OperationalError("disk I/O error")))
    assert error["code"] == "catalog_unavailable" and error["ref"] == "LIST"
    (listing,) = submits(rig.feed(AGENT, make("LIST")))
    (reply,) = [e.message for e in rig.run(listing) if isinstance(e, Send)]
    assert reply.t == "LIST_REPLY" and reply["snapshots"] == []
    (lookup,) = submits(rig.feed(AGENT, make("RESTORE", req=8, dataset="d0", snapshot="s1", window=1 << 20)))
    (error,) = errors_sent(rig.fail(lookup, OSError(5, "Input/output error")))
    assert error["code"] == "catalog_unavailable" and error["ref"] == "RESTORE"

    assert controller.errors_by_code["catalog_unavailable"] == 3
    rig.run(rig.due()[0])  # the held row goes in: available again
    assert controller.catalog_health.available
    assert submits(offer(rig, "other"))  # offers are taken again


def test_an_offer_whose_check_cannot_write_is_parked_and_a_probe_finds_the_catalog_back(tmp_path):
    rig = Rig(tmp_path)
    controller = rig.controller
    (check,) = submits(offer(rig, "d0"))
    out = rig.fail(check, sqlite_full())  # the placement row could not be written
    (error,) = errors_sent(out)
    assert error["code"] == "catalog_unavailable"
    (parked,) = [t for t in controller.status()["transfers"] if t["state"] == "parked"]
    assert parked["reason"].startswith("catalog_unavailable: ") and "SQLITE_FULL" in parked["reason"]
    assert not controller.transfers

    # nothing to record: a probe row is tried at the back-off, until one goes through
    (probe,) = rig.due()
    assert probe.key == ("probe",)
    rig.fail(probe, sqlite_full())
    assert not controller.catalog_health.available
    (probe,) = rig.due()
    rig.run(probe)
    assert controller.catalog_health.available and controller.catalog_due() is None
    (check,) = submits(offer(rig, "d0"))
    assert [e.message.t for e in rig.run(check) if isinstance(e, Send)] == ["OPEN"]


def test_a_held_upload_offered_again_is_still_recorded_and_the_new_offer_finds_it_committed(tmp_path):
    """The agent's reply watchdog may give up on a held COMMIT and offer again: the row is durable
    all the same once space is back, and the next offer is told the snapshot is committed."""
    rig = Rig(tmp_path)
    tid = rig.committing("d0")
    rig.committed(tid, "d0")
    rig.fail(rig.due()[0], sqlite_full())
    rig.feed(AGENT, make("ABORT", transfer_id=tid))
    assert tid not in rig.controller.transfers
    out = rig.run(rig.due()[0])
    assert not told_committed(out)
    assert rig.store.lookup("office-1", "d0", "s1") is not None
    assert rig.controller.index.newest_commit[("office-1", "d0")] is not None
    (check,) = submits(offer(rig, "d0"))
    (accept,) = [e.message for e in rig.run(check) if isinstance(e, Send)]
    assert accept.t == "ACCEPT" and accept["committed"] is True
