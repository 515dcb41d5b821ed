"""Credit-based flow control in bytes (the zguide's fileio3 idea, per transfer).

A receiver grants credit; a sender spends it and may never send more than it
holds. Two plain objects, no sockets:

- `SendCredit`: what a sender holds. `try_spend(n)` is the only way to put n
  bytes on the wire.
- `CreditPool`: what a receiver (or the broker on its behalf) has handed out.
  Invariant: `outstanding <= window`. Bytes come back with `release(n)` when
  the receiver has finished with them (a chunk stored, a block written).
"""

from __future__ import annotations

from bus.errors import LocalProtocolError


class SendCredit:
    def __init__(self, initial: int = 0):
        self.available = initial
        self.spent_total = 0

    def grant(self, n: int) -> None:
        if n < 0:
            raise LocalProtocolError(f"negative grant {n}")
        self.available += n

    def can_spend(self, n: int) -> bool:
        return n <= self.available

    def try_spend(self, n: int) -> bool:
        if n > self.available:
            return False
        self.available -= n
        self.spent_total += n
        return True

    def statistics(self) -> dict:
        return {"available": self.available, "spent_total": self.spent_total}


class CreditPool:
    def __init__(self, window: int):
        if window <= 0:
            raise LocalProtocolError(f"window must be positive, got {window}")
        self.window = window
        self.outstanding = 0

    @property
    def free(self) -> int:
        return self.window - self.outstanding

    def take(self, wanted: int) -> int:
        """Hand out up to `wanted` bytes; returns what was actually granted."""
        n = max(0, min(wanted, self.free))
        self.outstanding += n
        return n

    def release(self, n: int) -> None:
        # A peer that returns more than it was given is clamped, never trusted
        # to push outstanding below zero.
        self.outstanding = max(0, self.outstanding - n)

    def resize(self, window: int) -> None:
        self.window = max(1, window)

    def statistics(self) -> dict:
        return {"window": self.window, "outstanding": self.outstanding}
