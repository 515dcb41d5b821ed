"""Whether the catalog can be written now, and when to try it again (issue 11, "errors park, never kill").

Theory of operation. A catalog call that fails because the database or its
disk cannot serve (SQLITE_FULL, SQLITE_IOERR, a file that cannot be opened:
`catalog.unavailable_reason` says which errors those are) makes the catalog
*unavailable*, with that reason, until a write succeeds again. Meanwhile the
controller:
- holds the rows waiting to be recorded (their agents are not told
  COMMITTED: a snapshot is acknowledged only once its row is durable) and
  tries them again at `retry_at`, with a back-off that doubles from
  FIRST_RETRY_S up to MAX_RETRY_S;
- with no rows to try, writes a probe row at `retry_at` instead, so it
  notices by itself when space is back;
- refuses new OFFERs with `catalog_unavailable` before anything is made;
- still asks reads (LIST, a restore's lookup: a full disk usually serves
  them), and answers one that fails with `catalog_unavailable`.
Status shows the state, the reason and how many rows are held.

Plain logic on the loop: `now` in, no clock, no SQLite.
"""

from __future__ import annotations

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 10.0


class CatalogHealth:
    def __init__(self):
        self.reason: str | None = None  # None: available
        self.since: float | None = None
        self.retry_at: float | None = None
        self.failures = 0  # in a row, since the catalog was last available
        self.outages = 0  # since start

    @property
    def available(self) -> bool:
        return self.reason is None

    def failed(self, reason: str, now: float) -> None:
        """A call failed for want of disk or database: try again after the next back-off."""
        if self.reason is None:
            self.since = now
            self.outages += 1
        self.reason = reason
        self.failures += 1
        self.retry_at = now + min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (self.failures - 1))

    def succeeded(self) -> bool:
        """A write went through; True if that ended an outage."""
        was_down = self.reason is not None
        self.reason, self.since, self.retry_at, self.failures = None, None, None, 0
        return was_down

    def may_try(self, now: float) -> bool:
        """Whether a write may be handed to the catalog now (always, when it is available)."""
        return self.retry_at is None or now >= self.retry_at

    def status(self, now: float) -> dict:
        if self.reason is None:
            return {"available": True, "reason": None, "outages": self.outages}
        return {"available": False, "reason": self.reason, "unavailable_for_s": round(now - self.since, 3),
                "retry_in_s": round(max(0.0, self.retry_at - now), 3), "failures": self.failures,
                "outages": self.outages}
