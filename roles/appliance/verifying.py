"""The agent's `verify` action: the cloud re-reads each dataset's newest
committed snapshot and checks it against the local image's blake3.

The blake3 is the journal's (what this agent computed from the image when
it uploaded it and the cloud confirmed at commit), so a verify reads
nothing locally and still works once the local image is gone. A dataset is
due `verify_interval` after the later of its last verify and its newest
commit (a commit is itself verified against that blake3). One VERIFY is
outstanding at a time (the broker allows one per device); it goes out only
when no upload of an action ranked before `verify` in `action_order` is
queued or running (by default verify is last: the agent is idle). The
result is kept per dataset in the journal's database (table `verified`)
and shown in status as `last_verified`. A connection lost forgets the
VERIFY in flight; it is asked again in a later turn.

A mixin of AgentCore (core.py): it uses the core's journal, queue, serials
and outbox.
"""

from __future__ import annotations

from loguru import logger

from roles.appliance.planner import action_of
from schemas import make

SCHEMA = """
CREATE TABLE IF NOT EXISTS verified (
    dataset TEXT PRIMARY KEY,
    snapshot TEXT NOT NULL,
    verified_at REAL NOT NULL,
    match INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""
RETRY_S = 60.0  # after a refusal (node unavailable, over budget): asked again this much later


class AgentVerify:
    def init_verifying(self) -> None:
        self.journal.db.executescript(SCHEMA)
        self.verify_pending: dict[int, tuple] = {}  # req -> (dataset, snapshot)
        self.verify_retry_at: dict[str, float] = {}  # dataset -> wall time it may be asked again

    def last_verified(self, dataset: str) -> dict | None:
        row = self.journal.db.execute("SELECT snapshot, verified_at, match, reason FROM verified WHERE dataset=?",
                                      (dataset,)).fetchone()
        if row is None:
            return None
        return {"snapshot": row[0], "at": row[1], "match": bool(row[2]), "reason": row[3]}

    def _verify_blocked(self) -> bool:
        """An upload of an action ranked before `verify` is queued or running."""
        rank = {action: i for i, action in enumerate(self.config.action_order)}
        has_committed = self.journal.datasets_with_commits()
        pending = [*self.queue, *(u.pending for u in self.active.values())]
        return any(rank[action_of(p, self.resuming, has_committed)] < rank["verify"] for p in pending)

    def due_verifies(self, wall_now: float) -> list[tuple[str, str, bytes]]:
        """(dataset, snapshot, blake3) of each dataset whose newest commit is due a verify."""
        due = []
        for ds in self.config.datasets:
            row = self.journal.db.execute("SELECT snapshot, blake3, committed_at FROM committed WHERE dataset=? "
                                          "ORDER BY snapshot DESC LIMIT 1", (ds.name,)).fetchone()
            if row is None or row[1] is None or len(row[1]) != 32:
                continue  # nothing committed, or a journal row from before the blake3 was kept
            last = self.last_verified(ds.name)
            since = max(row[2], last["at"] if last else 0.0)
            if wall_now >= max(since + self.config.verify_interval, self.verify_retry_at.get(ds.name, 0.0)):
                due.append((ds.name, row[0], bytes(row[1])))
        return due

    def start_verifies(self, now: float) -> None:
        if not self.welcomed or self.once or self.verify_pending or self._verify_blocked():
            return
        due = self.due_verifies(self._wall_clock())
        if not due:
            return
        dataset, snapshot, digest = due[0]
        req = next(self.serials)
        self.verify_pending[req] = (dataset, snapshot)
        logger.info("asking the cloud to verify {}/{}", dataset, snapshot)
        self._send(make("VERIFY", req=req, dataset=dataset, snapshot=snapshot, image_blake3=digest))

    def on_VERIFIED(self, msg, now: float) -> None:
        entry = self.verify_pending.pop(msg.get("req"), None)
        if entry is None:
            return
        self._verified(*entry, msg["match"], msg["reason"])

    def verify_refused(self, msg) -> bool:
        """An ERROR answering our VERIFY: recorded when the cloud says it has no such snapshot, else asked
        again later. True if it was about a verify."""
        entry = self.verify_pending.pop(msg.get("req"), None)
        if entry is None or msg.get("ref") != "VERIFY":
            if entry is not None:
                self.verify_pending[msg["req"]] = entry
            return False
        dataset, snapshot = entry
        if msg["code"] in ("not_found", "damaged"):
            self._verified(dataset, snapshot, False, f"{msg['code']}: {msg['reason']}")
        else:
            logger.warning("verify of {}/{} refused ({}: {}); asking again later", dataset, snapshot, msg["code"],
                           msg["reason"])
            self.verify_retry_at[dataset] = self._wall_clock() + RETRY_S
        return True

    def _verified(self, dataset: str, snapshot: str, match: bool, reason: str) -> None:
        (logger.info if match else logger.error)("verify of {}/{}: {} ({})", dataset, snapshot,
                                                 "match" if match else "MISMATCH", reason)
        with self.journal.db:
            self.journal.db.execute("INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?, ?)",
                                    (dataset, snapshot, self._wall_clock(), int(match), reason[:256]))

    def verifies_lost(self) -> None:
        self.verify_pending.clear()
