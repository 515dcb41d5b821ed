"""SQLite opened for durability: WAL, and every commit fsync'd (synchronous=FULL).

Both the broker's catalog and the agent's journal record what must survive a
crash (a snapshot committed in the cloud); they open their database here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_durable(directory: str, filename: str, schema: str, check_same_thread: bool = True) -> sqlite3.Connection:
    """`check_same_thread=False` for a connection handed to one other thread (the broker's catalog pool)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(Path(directory) / filename, isolation_level=None, check_same_thread=check_same_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
