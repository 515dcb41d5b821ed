"""The catalog's side of a drain (roles/controller/drainrecords.py): a v2 SQLite catalog migrates with its
pending removals kept, and the index follows a moved dataset. What is left to move, read from the
catalog alone, and each switch as one transaction: tests/test_unit_catalog_contract.py, on SQLite and
PostgreSQL. End to end with real processes: tests/test_e2e_drain.py."""

from __future__ import annotations

import sqlite3

from roles.controller.catalog import MIGRATIONS, SCHEMA, SCHEMA_VERSION, CatalogIndex, CatalogStore, migrate


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
