"""Catalog bench: the embedded SQLite catalog against PostgreSQL, in the same run, on this machine.

    python bench/catalog.py [--rows 2000] [--batch 64] [--url postgresql://...]

Runs the catalog's contract methods as the broker's catalog thread does, on each engine:
- first placements (check_offer of a new dataset: a read, an INSERT ... ON CONFLICT, a read back);
- group commits of `--batch` rows (record_many: one transaction, one durable commit each);
- LIST pages of 1000 rows.
PostgreSQL is the server `--url` names, or one started for the run (tests/pgserver.py: initdb in
a temporary directory, unix socket only; needs Debian's postgresql). Prints each figure per
second and the PostgreSQL/SQLite ratio. Exit 2 if no PostgreSQL can be had.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roles.controller.catalog import CatalogStore  # noqa: E402

BLAKE = b"\x05" * 32


def measure(store, rows: int, batch: int) -> dict:
    started = time.perf_counter()
    for i in range(rows):
        store.check_offer(f"dev-{i % 97}", f"ds-{i}", "s1", f"node-{i % 3}")
    placements = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    commits = 0
    for first in range(0, rows, batch):
        store.record_many([(f"dev-{i % 97}", f"ds-{i}", "s1", f"node-{i % 3}", 1 << 30, 1024, BLAKE, float(i))
                           for i in range(first, min(rows, first + batch))])
        commits += 1
    elapsed = time.perf_counter() - started
    started, pages, after = time.perf_counter(), 0, None
    while True:
        _, after = store.list(after=after, limit=1000)
        pages += 1
        if after is None:
            break
    return {"placements/s": placements, "group commits/s": commits / elapsed, "rows committed/s": rows / elapsed,
            "list pages/s": pages / (time.perf_counter() - started)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--url", default="", help="a PostgreSQL database to use (its tables are created)")
    args = parser.parse_args()
    server = None
    url = args.url
    if not url:
        from tests import pgserver
        reason = pgserver.why_unavailable()
        if reason:
            print(f"bench/catalog.py: {reason}", file=sys.stderr)
            return 2
        server = pgserver.PgServer().start()
        url = server.create_database()
    try:
        from roles.controller.catalogpg import PgCatalogStore
        with tempfile.TemporaryDirectory() as directory:
            sqlite = CatalogStore(directory)
            base = measure(sqlite, args.rows, args.batch)
            sqlite.close()
        pg = PgCatalogStore(url)
        figures = measure(pg, args.rows, args.batch)
        pg.close()
    finally:
        if server is not None:
            server.remove()
    print(f"{args.rows} datasets, group commits of {args.batch} rows; PostgreSQL/SQLite measured in this run")
    print(f"{'':20} {'SQLite':>10} {'PostgreSQL':>11} {'ratio':>7}")
    for name, value in base.items():
        print(f"{name:20} {value:10.0f} {figures[name]:11.0f} {figures[name] / value:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
