"""The catalog on PostgreSQL (`catalog_url: postgresql://user@host:port/db`), through psycopg 3.

The brokers of one controller share it (DESIGN.md "Several brokers"). The
method contract and its SQL are `SqlCatalog`'s (catalog.py): this module only
supplies the engine, so what differs from SQLite is here and small:
- placeholders: the shared SQL says `?`, psycopg `%s`;
- the schema's types (BYTEA, DOUBLE PRECISION, BIGINT: PostgreSQL's INTEGER
  is 32 bits) and its versions, kept in a `schema_version` table, since
  PostgreSQL has no PRAGMA user_version. Opening migrates in place, one
  transaction per version under an advisory lock, so two brokers starting
  together apply each version once;
- where brokers race, the database decides: the first placement is an
  INSERT ... ON CONFLICT DO NOTHING read back (SqlCatalog.check_offer), and a
  retention run is held by one broker at a time (pg_try_advisory_xact_lock:
  the one that does not get it skips that run);
- the connection. Statements run in autocommit, transactions are explicit,
  and a commit returns only once the server has it durable (the server's
  synchronous_commit; COMMITTED is sent after that). A connection lost (the
  server stopped, restarted, unreachable) is dropped; the call that found it
  lost is tried once more on a new connection, and if that fails too its
  error (psycopg.OperationalError) is what `unavailable_reason` calls
  "cannot serve now": cataloghealth.py holds the writes and tries again, and
  each later call connects anew. The broker never ends for it.

Used from the catalog pool's one thread only, like the SQLite store.
"""

from __future__ import annotations

import functools

import psycopg

from bus.errors import SpeedSyncError
from roles.controller.catalog import CatalogVersionError, SqlCatalog

# version -> what brings a catalog to it from the version before (append only: never edit a released one).
# Version 1 is the shape SQLite's catalog has at its version 3.
MIGRATIONS = {
    1: ["CREATE TABLE snapshots (device_id TEXT NOT NULL, dataset TEXT NOT NULL, snapshot TEXT NOT NULL, "
        "node_id TEXT NOT NULL, size BIGINT NOT NULL, chunk_count BIGINT NOT NULL, blake3 BYTEA NOT NULL, "
        "committed_at DOUBLE PRECISION NOT NULL, taken_at DOUBLE PRECISION, "
        "PRIMARY KEY (device_id, dataset, snapshot))",
        "CREATE TABLE placements (device_id TEXT NOT NULL, dataset TEXT NOT NULL, node_id TEXT NOT NULL, "
        "PRIMARY KEY (device_id, dataset))",
        "CREATE TABLE probe (id INTEGER PRIMARY KEY, written_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE device_usage (device_id TEXT PRIMARY KEY, stored_bytes BIGINT NOT NULL)",
        "CREATE TABLE pruning (device_id TEXT NOT NULL, dataset TEXT NOT NULL, snapshot TEXT NOT NULL, "
        "node_id TEXT NOT NULL, pruned_at DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (device_id, dataset, snapshot, node_id))",
        "CREATE TABLE drains (node_id TEXT PRIMARY KEY, state TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL, "
        "datasets_total BIGINT NOT NULL)"],
}
SCHEMA_VERSION = max(MIGRATIONS)
# advisory lock keys (any 64-bit numbers, the same in every broker): "SSMG" and "SSRT"
MIGRATE_LOCK = 0x53534D47
RETENTION_LOCK = 0x53535254
CONNECT = {"autocommit": True, "connect_timeout": 5, "application_name": "speedsync-broker",
           # a server that vanishes without closing (a partition) is noticed in seconds, not hours
           "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
           "tcp_user_timeout": 10000}


def _reconnecting(method):
    """Run `method` on a live connection; a connection found lost is replaced and the call tried once
    more (every contract method may run twice: upserts of absolute values, reads, a prune that
    plans again)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        for attempt in (1, 2):
            reused = self.conn is not None
            self._connect()
            try:
                return method(self, *args, **kwargs)
            except psycopg.Error:
                if self.conn is not None and (self.conn.broken or self.conn.closed):
                    self._drop()
                    if attempt == 1 and reused:
                        continue
                raise
    return call


class PgCatalogStore(SqlCatalog):
    def __init__(self, url: str):
        self.url = url
        self.conn: psycopg.Connection | None = None
        try:
            self._connect()
            migrate(self.conn, url)
        except psycopg.OperationalError as exc:  # at start: the broker exits 1 saying why (systemd restarts it)
            if self.conn is not None:
                self._drop()
            raise SpeedSyncError(f"cannot reach the catalog at {_safe(url)}: {_first_line(exc)}",
                                 "catalog_unavailable") from None
        except BaseException:
            self._drop()
            raise

    def _connect(self) -> None:
        if self.conn is None:
            self.conn = psycopg.connect(self.url, **CONNECT)

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        try:
            conn.close()
        except psycopg.Error:
            pass

    def _execute(self, sql: str, args=()):
        return self.conn.execute(sql.replace("?", "%s"), args)

    def _executemany(self, sql: str, rows) -> None:
        rows = list(rows)
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    def _transaction(self):
        return self.conn.transaction()

    def _scan(self, sql: str):
        return _scan(self.conn, sql)

    def _maintenance_lock(self) -> bool:
        return self.conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,)).fetchone()[0]

    def close(self) -> None:
        if self.conn is not None:
            self._drop()


CONTRACT = ("placements", "newest_commits", "check_offer", "lookup", "record_many", "probe", "list", "prune",
            "pruning", "pruned", "usage", "save_usage", "drains", "start_drain", "end_drain", "drain_done",
            "datasets_to_move", "move_placement", "snapshots_on", "switch_node")
for _name in CONTRACT:
    setattr(PgCatalogStore, _name, _reconnecting(getattr(SqlCatalog, _name)))


def _scan(conn, sql: str):
    """The rows of `sql` a batch at a time (a server-side cursor: run inside a transaction)."""
    with conn.cursor(name="speedsync_scan") as cur:
        cur.itersize = 1000
        cur.execute(sql)
        yield from cur


def migrate(conn, where: str = "", migrations: dict = MIGRATIONS) -> int:
    """Bring the catalog to the newest version of `migrations`, one version per transaction, under an
    advisory lock (brokers starting together wait for each other); returns the version it had."""
    newest, had = max(migrations), None
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), "
                         "version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
            had = version if had is None else had
            if version > newest:
                raise CatalogVersionError(f"the catalog at {_safe(where)} has schema version {version}, newer "
                                          f"than this broker's {newest}: run the newer broker")
            if version == newest:
                return had
            for statement in migrations[version + 1]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = %s", (version + 1,))


class PgReader:
    """A read-only session for `speedsync prune --dry-run` beside running brokers."""

    def __init__(self, conn):
        self.conn = conn

    def scan(self, sql: str):
        return _scan(self.conn, sql)

    def close(self) -> None:
        self.conn.close()


def open_read_only_pg(url: str) -> PgReader:
    try:
        conn = psycopg.connect(url, **{**CONNECT, "autocommit": False})
    except psycopg.OperationalError as exc:
        raise SpeedSyncError(f"cannot reach the catalog at {_safe(url)}: {_first_line(exc)}",
                             "catalog_unavailable") from None
    conn.read_only = True
    try:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    except psycopg.errors.UndefinedTable:
        conn.close()
        raise CatalogVersionError(f"no catalog at {_safe(url)}: start a broker once to create it") from None
    if row is None or row[0] != SCHEMA_VERSION:
        conn.close()
        raise CatalogVersionError(f"the catalog at {_safe(url)} has schema version {row and row[0]}, this broker "
                                  f"{SCHEMA_VERSION}: start the broker once to migrate it")
    return PgReader(conn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _safe(url: str) -> str:
    """The URL without a password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the catalog_url"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**info)
