"""Compression effort that fits the bottleneck.

When the link is what holds uploads back (chunks wait for the bandwidth
limit), spending more CPU on compression sends fewer bytes through it: the
level goes up. When the wire waits for chunks (hashing and compression are
the bottleneck), the level comes down. One step per period, within bounds.
"""

from __future__ import annotations


class CompressionEffort:
    def __init__(self, level: int, adapt: bool, low: int = 1, high: int = 9, period_s: float = 2.0):
        self.level = level
        self.adapt = adapt
        self.low = min(low, level)
        self.high = max(high, level)
        self.period_s = period_s
        self._next = 0.0

    def due(self, now: float) -> bool:
        return self.adapt and now >= self._next

    def update(self, now: float, link_bound: int, starved: int) -> int:
        """`link_bound`/`starved`: wire pumps since the last call that stopped on
        the bandwidth limit / found no chunk ready."""
        if not self.adapt or now < self._next:
            return self.level
        self._next = now + self.period_s
        total = link_bound + starved
        if total >= 4:
            if link_bound > 0.8 * total and self.level < self.high:
                self.level += 1
            elif starved > 0.5 * total and self.level > self.low:
                self.level -= 1
        return self.level
