"""The catalog's side of a drain (roles/controller/drainrecords.py): what is left to move is read
from the catalog alone, each switch is one transaction, and a v2 catalog migrates with its pending
removals kept. End to end with real processes: tests/test_e2e_drain.py."""

from __future__ import annotations

import sqlite3

from roles.controller.catalog import MIGRATIONS, SCHEMA, SCHEMA_VERSION, CatalogIndex, CatalogStore, migrate

BLAKE = b"\x01" * 32


def catalog(tmp_path) -> CatalogStore:
    store = CatalogStore(str(tmp_path / "broker"))
    store.record_many([("office-1", "fs", s, "node-a", 4096, 1, BLAKE, t) for s, t in (("s1", 10), ("s2", 20))])
    store.record_many([("office-1", "sql", "s1", "node-b", 4096, 1, BLAKE, 10)])
    for device, dataset, node in (("office-1", "fs", "node-a"), ("office-1", "sql", "node-b"),
                                  ("office-2", "new", "node-a")):
        store.check_offer(device, dataset, "s9", node)  # records the placement, as an OFFER does
    return store


def test_a_drain_is_read_back_from_the_catalog_and_each_switch_is_one_step(tmp_path):
    store = catalog(tmp_path)
    assert store.start_drain("node-a") == ("draining", 2)
    assert store.start_drain("node-a") == ("draining", 2)  # asked again: the same drain
    assert store.datasets_to_move("node-a") == [("office-1", "fs", "node-a"), ("office-2", "new", "node-a")]

    store.move_placement("office-1", "fs", "node-b")  # step 1: its next snapshots go to node-b
    # still to move: its snapshots on node-a, now placed on node-b (a restarted broker takes it from here)
    assert store.datasets_to_move("node-a") == [("office-1", "fs", "node-b"), ("office-2", "new", "node-a")]
    assert [r[0] for r in store.snapshots_on("office-1", "fs", "node-a")] == ["s1", "s2"]
    assert ("office-1", "fs", "node-b") in store.placements()

    assert store.switch_node("office-1", "fs", "s1", "node-a", "node-b") == "node-a"
    assert store.switch_node("office-1", "fs", "s1", "node-a", "node-b") == "node-a"  # twice: no harm
    assert store.lookup("office-1", "fs", "s1")["node_id"] == "node-b"
    assert store.pruning() == [("office-1", "fs", "s1", "node-a")]
    assert [r[0] for r in store.snapshots_on("office-1", "fs", "node-a")] == ["s2"]

    # s2 pruned by retention while its copy ran: the copy on node-b is the one to remove
    store.db.execute("DELETE FROM snapshots WHERE snapshot='s2'")
    assert store.switch_node("office-1", "fs", "s2", "node-a", "node-b") == "node-b"
    assert store.datasets_to_move("node-a") == [("office-2", "new", "node-a")]

    store.drain_done("node-a")
    assert store.drains() == [("node-a", "drained", 2)]
    assert store.end_drain("node-a") and store.drains() == [] and not store.end_drain("node-a")


def test_one_snapshot_may_wait_for_removal_from_two_nodes(tmp_path):
    store = catalog(tmp_path)
    store.switch_node("office-1", "fs", "s1", "node-a", "node-b")
    store.db.execute("INSERT OR REPLACE INTO pruning VALUES ('office-1', 'fs', 's1', 'node-b', 0)")
    assert store.pruning() == [("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s1", "node-b")]
    store.pruned([("office-1", "fs", "s1", "node-b")])
    assert store.pruning() == [("office-1", "fs", "s1", "node-a")]


def test_a_version_2_catalog_keeps_its_pending_removals(tmp_path):
    directory = tmp_path / "broker"
    directory.mkdir()
    db = sqlite3.connect(directory / "catalog.sqlite3", isolation_level=None)
    db.executescript(SCHEMA)
    migrate(db, str(directory), {v: MIGRATIONS[v] for v in (1, 2)})
    db.execute("INSERT INTO pruning VALUES ('office-1', 'fs', 's1', 'node-a', 5.0)")
    db.close()
    store = CatalogStore(str(directory))
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.pruning() == [("office-1", "fs", "s1", "node-a")] and store.drains() == []


def test_the_index_follows_a_moved_dataset():
    index = CatalogIndex([("office-1", "fs", "node-a"), ("office-1", "sql", "node-a")])
    index.move("office-1", "fs", "node-b")
    assert index.node_for("office-1", "fs") == "node-b"
    assert (index.datasets_on("node-a"), index.datasets_on("node-b")) == (1, 1)
    index.move("office-1", "fs", "node-b")
    assert index.datasets_on("node-b") == 1
