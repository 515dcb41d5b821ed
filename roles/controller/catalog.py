"""The cloud catalog: committed snapshots, kept durably by the broker.

`SqlCatalog` is the method contract, in SQL both engines run; `CatalogStore`
is the embedded SQLite engine (`catalog_url: ""`, the default), and
catalogpg.py's `PgCatalogStore` the PostgreSQL one that brokers of one
controller share (`open_store` picks by catalog_url).

Two halves, so that no SQLite commit (synchronous=FULL: an fsync each) runs
on the broker's loop:
- `CatalogStore` owns the database and runs only on the "catalog" pool's one
  thread. The controller calls it through `Submit` effects; each result
  comes back as `completed()`.
- `CatalogIndex` is the in-memory index the loop reads at once: which node
  holds a dataset, how many datasets each node holds, and when each
  dataset's newest snapshot was committed (None: placed, never committed),
  which status's `datasets_behind` walks on request only.

LIST is keyset-paginated: each call returns at most one page, in key
order, and the key of its last row is where the next page starts (DESIGN.md
"Fleet operations", no reply is unbounded).

A snapshot is in the catalog only after its storage node committed it
(verified, manifest durable), and the row is committed before the agent is
told. A dataset's placement is durable before its first upload is opened.
`device_usage` holds each device's stored bytes for quotas
(roles/controller/quota.py), saved from memory about once a second.

Schema versions: `PRAGMA user_version` says which of MIGRATIONS a catalog
has had; opening one applies the rest in order, each in its own transaction
with the version it brings, so a catalog written before a migration is
upgraded in place (its rows kept) and one cut short by a crash resumes. A
catalog newer than this broker is refused rather than misread.

An SQLite error does not end the broker: every call runs on the pool, its
error comes back to the controller, and `unavailable_reason` tells a
catalog that cannot serve now (full disk, I/O error: held and tried again,
cataloghealth.py) from a bug (the one request fails `internal`).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections import Counter
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

from bus.errors import RequestError, SpeedSyncError
from roles.controller.drainrecords import UPSERT_PRUNING, DrainRecords
from roles.durabledb import open_durable
from roles.counting import decrement
from roles.retention import Snapshot, to_prune

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
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    written_at REAL NOT NULL
);
"""
# version -> what brings a catalog to it from the version before (append only: never edit a released one)
MIGRATIONS = {
    # quotas: bytes stored per device; a catalog from before starts every device at 0 (what it stored
    # earlier was never counted: the nodes' ownership logs are the only record of it)
    1: ["CREATE TABLE device_usage (device_id TEXT PRIMARY KEY, stored_bytes INTEGER NOT NULL)"],
    # retention: each snapshot's time (the image's mtime; a catalog from before takes committed_at), and the
    # snapshots pruned from the catalog whose manifests their node has not yet confirmed removed
    2: ["ALTER TABLE snapshots ADD COLUMN taken_at REAL",
        "UPDATE snapshots SET taken_at = committed_at",
        "CREATE TABLE pruning (device_id TEXT NOT NULL, dataset TEXT NOT NULL, snapshot TEXT NOT NULL, "
        "node_id TEXT NOT NULL, pruned_at REAL NOT NULL, PRIMARY KEY (device_id, dataset, snapshot))"],
    # drain: the nodes being drained (or drained); and a manifest to remove is one node's, so one snapshot may
    # wait for removal from two nodes (a drained source, and later its new node when retention prunes it)
    3: ["CREATE TABLE drains (node_id TEXT PRIMARY KEY, state TEXT NOT NULL, started_at REAL NOT NULL, "
        "datasets_total INTEGER NOT NULL)",
        "CREATE TABLE pruning_v3 (device_id TEXT NOT NULL, dataset TEXT NOT NULL, snapshot TEXT NOT NULL, "
        "node_id TEXT NOT NULL, pruned_at REAL NOT NULL, PRIMARY KEY (device_id, dataset, snapshot, node_id))",
        "INSERT INTO pruning_v3 SELECT device_id, dataset, snapshot, node_id, pruned_at FROM pruning",
        "DROP TABLE pruning",
        "ALTER TABLE pruning_v3 RENAME TO pruning"],
}
SCHEMA_VERSION = max(MIGRATIONS)
COLUMNS = "device_id, dataset, snapshot, node_id, size, chunk_count, blake3, committed_at, taken_at"


class SqlCatalog(DrainRecords):
    """The catalog's method contract, in SQL both engines run (placeholders `?`; upserts as
    INSERT ... ON CONFLICT). An engine supplies `_execute`, `_executemany`, `_transaction`,
    `_scan` and `_maintenance_lock` (CatalogStore here, PgCatalogStore in catalogpg.py)."""

    def placements(self) -> list[tuple]:
        """(device, dataset, node) of every dataset: where its next snapshots go. The placement row
        wins (a drain moves it before the dataset's snapshots follow); a dataset without one (a catalog
        from before placements were recorded) is where its committed snapshots are."""
        out = {}
        for device, dataset, node in self._execute(
                "SELECT device_id, dataset, MIN(node_id) FROM snapshots GROUP BY device_id, dataset"):
            out[(device, dataset)] = node
        for device, dataset, node in self._execute("SELECT device_id, dataset, node_id FROM placements"):
            out[(device, dataset)] = node
        return [(d, s, n) for (d, s), n in out.items()]

    def newest_commits(self) -> list[tuple]:
        """(device, dataset, newest committed_at) of every dataset that has a committed snapshot."""
        return [tuple(r) for r in self._execute(
            "SELECT device_id, dataset, MAX(committed_at) FROM snapshots GROUP BY device_id, dataset")]

    def check_offer(self, device_id: str, dataset: str, snapshot: str,
                    node_id: str | None) -> tuple[dict | None, str | None]:
        """(the snapshot's row if it is committed, else None; the node the dataset is placed on).
        A dataset not yet placed is placed on `node_id` (durably, once): where brokers race, the first
        placement wins (INSERT ... ON CONFLICT DO NOTHING) and every one of them reads back the winner."""
        existing = self.lookup(device_id, dataset, snapshot)
        if existing is not None:
            return existing, existing["node_id"]
        if self._execute("SELECT 1 FROM pruning WHERE device_id=? AND dataset=? AND snapshot=?",
                         (device_id, dataset, snapshot)).fetchone():
            # its manifest is still to be removed from the node: a new upload of it now would commit a
            # manifest that the pending PRUNE then deletes
            raise RequestError(f"{dataset}/{snapshot} was pruned and its removal is not finished; offer it again "
                               "later", "pruned")
        if node_id is None:
            return None, None
        self._execute("INSERT INTO placements VALUES (?, ?, ?) ON CONFLICT (device_id, dataset) DO NOTHING",
                      (device_id, dataset, node_id))
        won = self._execute("SELECT node_id FROM placements WHERE device_id=? AND dataset=?",
                            (device_id, dataset)).fetchone()
        return None, (won[0] if won else node_id)

    def lookup(self, device_id: str, dataset: str, snapshot: str) -> dict | None:
        row = self._execute(f"SELECT {COLUMNS} FROM snapshots WHERE device_id=? AND dataset=? AND snapshot=?",
                            (device_id, dataset, snapshot)).fetchone()
        return _row(row) if row else None

    def record_many(self, rows: list) -> float:
        """Group commit: every row (device, dataset, snapshot, node, size, chunk_count, blake3[, taken_at])
        in one transaction, so one fsync covers them all. Returns their `committed_at` (wall-clock
        seconds), which is also the taken_at of a row without one. Recording a row again replaces it."""
        committed_at = time.time()
        with self._transaction():
            self._executemany(UPSERT_SNAPSHOT, [(*row[:7], committed_at, row[7] if len(row) > 7 and row[7]
                                                 is not None else committed_at) for row in rows])
        return committed_at

    def probe(self) -> None:
        """One small durable write: whether the catalog can record again (its disk has room, its server answers)."""
        with self._transaction():
            self._execute("INSERT INTO probe VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET "
                          "written_at=excluded.written_at", (time.time(),))

    def list(self, device_id: str | None = None, dataset: str | None = None, after: tuple | None = None,
             limit: int = 1000) -> tuple[list[dict], tuple | None]:
        """One page: up to `limit` rows after the key `after` (device, dataset, snapshot), in key
        order, and the key to ask after for the next page (None: this was the last)."""
        where, args = [], []
        if device_id is not None:
            where.append("device_id=?")
            args.append(device_id)
        if dataset is not None:
            where.append("dataset=?")
            args.append(dataset)
        if after is not None:
            where.append("(device_id, dataset, snapshot) > (?, ?, ?)")
            args.extend(after)
        query = f"SELECT {COLUMNS} FROM snapshots"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY device_id, dataset, snapshot LIMIT ?"
        rows = [_row(r) for r in self._execute(query, (*args, limit + 1))]
        if len(rows) <= limit:
            return rows, None
        last = rows[limit - 1]
        return rows[:limit], (last["device_id"], last["dataset"], last["snapshot"])

    def prune(self, policy, protected: frozenset) -> list[tuple] | None:
        """Apply the retention policy (roles/retention.py) to every dataset: the rows it does not keep
        leave `snapshots` and enter `pruning`, in one transaction. Returns every (device, dataset,
        snapshot, node) whose manifest is still to be removed, these and any left from before; or None
        when another broker of the controller holds this run (the maintenance lock): it is skipped."""
        if policy:
            with self._transaction():
                if not self._maintenance_lock():
                    return None
                doomed = [row[:4] for row in plan_rows(self._scan(PLAN_QUERY), policy, protected)]
                if doomed:
                    now = time.time()
                    self._executemany("DELETE FROM snapshots WHERE device_id=? AND dataset=? AND snapshot=?",
                                      [d[:3] for d in doomed])
                    self._executemany(UPSERT_PRUNING, [(*d, now) for d in doomed])
        return self.pruning()

    def pruning(self) -> list[tuple]:
        """(device, dataset, snapshot, node) of every pruned snapshot whose node has not confirmed it."""
        return [tuple(r) for r in self._execute("SELECT device_id, dataset, snapshot, node_id FROM pruning "
                                                "ORDER BY device_id, dataset, snapshot, node_id")]

    def pruned(self, keys: list) -> None:
        """The nodes removed these manifests, each (device, dataset, snapshot, node): forget them (one
        transaction)."""
        with self._transaction():
            self._executemany("DELETE FROM pruning WHERE device_id=? AND dataset=? AND snapshot=? AND node_id=?",
                              keys)

    def usage(self) -> dict:
        """{device: stored bytes} of every device that stored anything (read once, at start)."""
        return {d: n for d, n in self._execute("SELECT device_id, stored_bytes FROM device_usage")}

    def save_usage(self, usage: dict) -> None:
        """Absolute values, in one transaction (one fsync), so saving the same twice is harmless."""
        with self._transaction():
            self._executemany("INSERT INTO device_usage VALUES (?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                              "stored_bytes=excluded.stored_bytes", list(usage.items()))


UPSERT_SNAPSHOT = (f"INSERT INTO snapshots ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT (device_id, dataset, snapshot) DO UPDATE SET node_id=excluded.node_id, "
                   "size=excluded.size, chunk_count=excluded.chunk_count, blake3=excluded.blake3, "
                   "committed_at=excluded.committed_at, taken_at=excluded.taken_at")
PLAN_QUERY = ("SELECT device_id, dataset, snapshot, node_id, taken_at FROM snapshots "
              "ORDER BY device_id, dataset, snapshot")


class CatalogStore(SqlCatalog):
    """The SQLite engine (`catalog_url: ""`): `catalog.sqlite3` in the broker's data_dir, WAL, every
    commit fsync'd. After construction, used from one thread only (the catalog pool's)."""

    def __init__(self, data_dir: str):
        self.db = open_durable(data_dir, "catalog.sqlite3", SCHEMA, check_same_thread=False)
        migrate(self.db, data_dir)

    def _execute(self, sql: str, args=()):
        return self.db.execute(sql, args)

    def _executemany(self, sql: str, rows) -> None:
        self.db.executemany(sql, rows)

    def _scan(self, sql: str):
        return self.db.execute(sql)

    def _maintenance_lock(self) -> bool:
        return True  # one broker per SQLite catalog

    @contextmanager
    def _transaction(self):
        self._end_stray_transaction()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self._end_stray_transaction()
            raise

    def _end_stray_transaction(self) -> None:
        """Roll back what a failed commit left open (SQLite does not always), so the next
        BEGIN is not refused for ever; a rollback that fails too leaves it to the next call."""
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        self.db.close()


def plan_rows(rows, policy, protected=frozenset()) -> list[tuple]:
    """(device, dataset, snapshot, node, taken_at) of every row of `rows` (PLAN_QUERY's, in its order)
    the policy does not keep, by dataset, oldest first. One dataset's rows are in memory at a time."""
    plan = []
    protected_by_dataset: dict[tuple, set] = {}
    for device, dataset, snapshot in protected:
        protected_by_dataset.setdefault((device, dataset), set()).add(snapshot)
    for (device, dataset), group in groupby(rows, key=lambda r: (r[0], r[1])):
        by_name = {r[2]: tuple(r) for r in group}
        names = to_prune([Snapshot(name, r[4]) for name, r in by_name.items()], policy.rules_for(device, dataset),
                         protected_by_dataset.get((device, dataset), ()))
        plan.extend(by_name[name] for name in names)
    return plan


def prune_plan(reader, policy, protected=frozenset()) -> list[tuple]:
    """What `prune` would remove now, from a catalog opened by `open_read_only`."""
    return plan_rows(reader.scan(PLAN_QUERY), policy, protected)


def open_read_only(data_dir: str, catalog_url: str = ""):
    """The catalog for reading beside a running broker (`speedsync prune --dry-run`): an object with
    `scan(sql)` and `close()`. It must exist and be of this broker's schema (the broker migrates it at start)."""
    if catalog_url:
        from roles.controller.catalogpg import open_read_only_pg
        return open_read_only_pg(catalog_url)
    path = Path(data_dir) / "catalog.sqlite3"
    if not path.exists():
        raise CatalogVersionError(f"no catalog at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        db.close()
        raise CatalogVersionError(f"the catalog in {data_dir} has schema version {version}, this broker "
                                  f"{SCHEMA_VERSION}: start the broker once to migrate it")
    return SqliteReader(db)


class SqliteReader:
    def __init__(self, db):
        self.db = db

    def scan(self, sql: str):
        return self.db.execute(sql)

    def close(self) -> None:
        self.db.close()


def open_store(data_dir: str, catalog_url: str = "") -> SqlCatalog:
    """The broker's catalog: SQLite in `data_dir`, or the PostgreSQL database `catalog_url` names."""
    if catalog_url:
        from roles.controller.catalogpg import PgCatalogStore
        return PgCatalogStore(catalog_url)
    return CatalogStore(data_dir)


class CatalogVersionError(SpeedSyncError):
    """The catalog is newer than this broker (the CLI exits 1 with the reason)."""


def migrate(db, where: str = "", migrations: dict = MIGRATIONS) -> int:
    """Bring the catalog to the newest version of `migrations`; returns the version it had."""
    had, newest = db.execute("PRAGMA user_version").fetchone()[0], max(migrations)
    if had > newest:
        raise CatalogVersionError(f"the catalog in {where} has schema version {had}, newer than this broker's "
                                  f"{newest}: run the newer broker")
    for version in range(had + 1, newest + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in migrations[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return had


class CatalogIndex:
    """Placement and newest commits in memory, on the loop: O(1) lookups, counts and updates."""

    def __init__(self, placements=(), newest_commits=()):
        self._placement: dict[tuple, str] = {}
        self._datasets_per_node: Counter = Counter()
        self.newest_commit: dict[tuple, float | None] = {}  # (device, dataset) -> committed_at or None
        for device, dataset, node in placements:
            self.place(device, dataset, node)
        for device, dataset, committed_at in newest_commits:
            self.committed(device, dataset, committed_at)

    def move(self, device_id: str, dataset: str, node_id: str) -> None:
        """A drain moved the dataset: its next snapshots go to `node_id`."""
        key = (device_id, dataset)
        was = self._placement.get(key)
        if was == node_id:
            return
        if was is not None:
            decrement(self._datasets_per_node, was)
        self._placement[key] = node_id
        self._datasets_per_node[node_id] += 1
        self.newest_commit.setdefault(key, None)

    def place(self, device_id: str, dataset: str, node_id: str) -> bool:
        """Record where a dataset lives (first placement wins); True if it was new."""
        key = (device_id, dataset)
        if key in self._placement:
            return False
        self._placement[key] = node_id
        self._datasets_per_node[node_id] += 1
        self.newest_commit.setdefault(key, None)
        return True

    def committed(self, device_id: str, dataset: str, committed_at: float) -> None:
        key = (device_id, dataset)
        newest = self.newest_commit.get(key)
        if newest is None or committed_at > newest:
            self.newest_commit[key] = committed_at

    def behind(self, wall_now: float, rpo_s: float) -> list[tuple]:
        """(device, dataset, newest committed_at or None) of every dataset older than the RPO.
        Walks every dataset: for a status request, never on the per-message path."""
        oldest_fresh = wall_now - rpo_s
        return [(d, s, at) for (d, s), at in self.newest_commit.items() if at is None or at < oldest_fresh]

    def node_for(self, device_id: str, dataset: str) -> str | None:
        return self._placement.get((device_id, dataset))

    def datasets_on(self, node_id: str) -> int:
        return self._datasets_per_node[node_id]


def unavailable_reason(error: BaseException) -> str | None:
    """The reason, if `error` says the catalog cannot serve now (its disk is full or failing, its file
    cannot be opened or is damaged, its PostgreSQL server is unreachable, restarting or out of room)
    rather than that a request was wrong; else None."""
    if isinstance(error, (sqlite3.OperationalError, OSError)) or type(error) is sqlite3.DatabaseError:
        name = getattr(error, "sqlite_errorname", None)
        return f"{name}: {error}" if name else str(error)
    psycopg = sys.modules.get("psycopg")  # imported only by a PostgreSQL catalog
    if psycopg is not None and isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        state = getattr(error, "sqlstate", None)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"postgresql {state or type(error).__name__}: {first}"
    return None


def _row(r) -> dict:
    return {"device_id": r[0], "dataset": r[1], "snapshot": r[2], "node_id": r[3], "size": r[4],
            "chunk_count": r[5], "blake3": r[6].hex(), "committed_at": r[7], "taken_at": r[8]}
