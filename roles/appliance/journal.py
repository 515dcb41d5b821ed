"""The agent's local journal (SQLite, WAL): which snapshots the cloud has committed.

A restart does not replicate a committed snapshot again. A snapshot that was
in progress is simply offered again: the cloud's answer to the manifest says
what it already holds, so only the missing chunks travel.
"""

from __future__ import annotations

import time

from roles.durabledb import open_durable

SCHEMA = """
CREATE TABLE IF NOT EXISTS in_progress (
    dataset TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    path TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (dataset, snapshot)
);
CREATE TABLE IF NOT EXISTS skipped (
    dataset TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (dataset, snapshot)
);
CREATE TABLE IF NOT EXISTS committed (
    dataset TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    blake3 BLOB,
    size INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    PRIMARY KEY (dataset, snapshot)
);
"""


class Journal:
    def __init__(self, state_dir: str):
        self.db = open_durable(state_dir, "journal.sqlite3", SCHEMA)

    def committed_snapshots(self, dataset: str) -> set:
        return {r[0] for r in self.db.execute("SELECT snapshot FROM committed WHERE dataset=?", (dataset,))}

    def settled_snapshots(self, dataset: str) -> set:
        """Committed or deliberately skipped: nothing more to do for these."""
        return self.committed_snapshots(dataset) | {
            r[0] for r in self.db.execute("SELECT snapshot FROM skipped WHERE dataset=?", (dataset,))}

    def record_skipped(self, dataset: str, snapshot: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)", (dataset, snapshot, reason))

    def newest_committed(self, dataset: str) -> tuple | None:
        """(snapshot, size, committed_at) of the dataset's newest committed snapshot."""
        return self.db.execute("SELECT snapshot, size, committed_at FROM committed WHERE dataset=? "
                               "ORDER BY snapshot DESC LIMIT 1", (dataset,)).fetchone()

    def previous_committed(self, dataset: str, snapshot: str) -> str | None:
        row = self.db.execute("SELECT snapshot FROM committed WHERE dataset=? AND snapshot<? "
                              "ORDER BY snapshot DESC LIMIT 1", (dataset, snapshot)).fetchone()
        return row[0] if row else None

    def last_commit_times(self) -> dict[str, float]:
        """dataset -> committed_at (wall-clock seconds) of its newest commit."""
        return dict(self.db.execute("SELECT dataset, MAX(committed_at) FROM committed GROUP BY dataset"))

    def datasets_with_commits(self) -> set:
        return {r[0] for r in self.db.execute("SELECT DISTINCT dataset FROM committed")}

    def record_committed(self, dataset: str, snapshot: str, blake3: bytes | None, size: int) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO committed VALUES (?, ?, ?, ?, ?)",
                            (dataset, snapshot, blake3, size, time.time()))
            self.db.execute("DELETE FROM in_progress WHERE dataset=? AND snapshot=?", (dataset, snapshot))

    def record_started(self, dataset: str, snapshot: str, path: str) -> bool:
        """Note an upload as under way; True if it was already (we are resuming it)."""
        row = self.db.execute("SELECT started_at FROM in_progress WHERE dataset=? AND snapshot=?",
                              (dataset, snapshot)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO in_progress VALUES (?, ?, ?, ?)", (dataset, snapshot, path, time.time()))
        return row is not None

    def interrupted(self) -> list[tuple[str, str, str]]:
        """(dataset, snapshot, path) of uploads a previous run did not finish."""
        return list(self.db.execute("SELECT dataset, snapshot, path FROM in_progress"))

    def forget_started(self, dataset: str, snapshot: str) -> None:
        self.db.execute("DELETE FROM in_progress WHERE dataset=? AND snapshot=?", (dataset, snapshot))

    def close(self) -> None:
        self.db.close()
