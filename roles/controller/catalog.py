"""The cloud catalog: committed snapshots, kept durably by the broker (SQLite).

A snapshot is in the catalog only after its storage node committed it
(verified, manifest durable), and the row is committed with synchronous=FULL
before the agent is told. The catalog also answers placement: which node
holds a dataset, and how many datasets each node holds.
"""

from __future__ import annotations

import time

from roles.durabledb import open_durable

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    device_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    node_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    blake3 BLOB NOT NULL,
    committed_at REAL NOT NULL,
    PRIMARY KEY (device_id, dataset, snapshot)
);
CREATE TABLE IF NOT EXISTS placements (
    device_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    node_id TEXT NOT NULL,
    PRIMARY KEY (device_id, dataset)
);
"""


class Catalog:
    def __init__(self, data_dir: str):
        self.db = open_durable(data_dir, "catalog.sqlite3", SCHEMA)
        self._placement: dict[tuple, str] = {}
        self._datasets_per_node: dict[str, set] = {}
        for device, dataset, node in self.db.execute(
                "SELECT device_id, dataset, node_id FROM snapshots GROUP BY device_id, dataset"):
            self._place(device, dataset, node)
        for device, dataset, node in self.db.execute("SELECT device_id, dataset, node_id FROM placements"):
            if (device, dataset) not in self._placement:
                self._place(device, dataset, node)

    def place(self, device_id: str, dataset: str, node_id: str) -> None:
        """Record where a dataset's first upload goes (durably, once)."""
        if (device_id, dataset) in self._placement:
            return
        self.db.execute("INSERT OR IGNORE INTO placements VALUES (?, ?, ?)", (device_id, dataset, node_id))
        self._place(device_id, dataset, node_id)

    def _place(self, device_id: str, dataset: str, node_id: str) -> None:
        self._placement[(device_id, dataset)] = node_id
        self._datasets_per_node.setdefault(node_id, set()).add((device_id, dataset))

    def node_for(self, device_id: str, dataset: str) -> str | None:
        return self._placement.get((device_id, dataset))

    def datasets_on(self, node_id: str) -> int:
        return len(self._datasets_per_node.get(node_id, ()))

    def lookup(self, device_id: str, dataset: str, snapshot: str) -> dict | None:
        row = self.db.execute(
            "SELECT device_id, dataset, snapshot, node_id, size, chunk_count, blake3, committed_at FROM snapshots "
            "WHERE device_id=? AND dataset=? AND snapshot=?", (device_id, dataset, snapshot)).fetchone()
        return _row(row) if row else None

    def record(self, device_id, dataset, snapshot, node_id, size, chunk_count, blake3: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device_id, dataset, snapshot, node_id, size, chunk_count, blake3, time.time()))
        self._place(device_id, dataset, node_id)

    def list(self, device_id: str | None = None) -> list[dict]:
        query = ("SELECT device_id, dataset, snapshot, node_id, size, chunk_count, blake3, committed_at "
                 "FROM snapshots")
        args: tuple = ()
        if device_id is not None:
            query += " WHERE device_id=?"
            args = (device_id,)
        query += " ORDER BY device_id, dataset, snapshot"
        return [_row(r) for r in self.db.execute(query, args)]

    def close(self) -> None:
        self.db.close()


def _row(r) -> dict:
    return {"device_id": r[0], "dataset": r[1], "snapshot": r[2], "node_id": r[3], "size": r[4],
            "chunk_count": r[5], "blake3": r[6].hex(), "committed_at": r[7]}
