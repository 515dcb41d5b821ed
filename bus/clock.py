"""Time as an input: the one place a role reads the clock, and a fake for tests.

Cores never read the clock; they take `now` (seconds, monotonic) as an
argument. A driver asks its `MonotonicClock` once per loop turn; tests drive
the same cores on a `FakeClock` they move by hand (trio's MockClock idea).
"""

from __future__ import annotations

import time


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told: `advance(seconds)` or `jump(to)`."""

    def __init__(self, start: float = 1000.0):
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += seconds
        return self._now

    def jump(self, to: float) -> float:
        return self.advance(to - self._now)
