"""A link that drops or delays frames, chosen by config, for tests.

Pure logic with a seeded RNG and time as an argument: `admit(message, now)`
says whether a message goes now, later (held until `due(now)` releases it)
or never. The agent's broker link consults it for every message it sends.
"""

from __future__ import annotations

import heapq
import itertools
import random


class LinkFaults:
    def __init__(self, drop_rate: float = 0.0, delay_ms: int = 0, seed: int = 0):
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError("drop_rate must be in [0, 1)")
        self.drop_rate = drop_rate
        self.delay_s = delay_ms / 1000
        self.rng = random.Random(seed)
        self._held: list = []
        self._order = itertools.count()
        self.dropped = 0
        self.delayed = 0

    @property
    def active(self) -> bool:
        return self.drop_rate > 0 or self.delay_s > 0

    def admit(self, message, now: float) -> bool:
        """True: send it now. False: dropped, or held for `due`."""
        if self.drop_rate and self.rng.random() < self.drop_rate:
            self.dropped += 1
            return False
        if self.delay_s:
            heapq.heappush(self._held, (now + self.delay_s, next(self._order), message))
            self.delayed += 1
            return False
        return True

    def next_due(self) -> float | None:
        return self._held[0][0] if self._held else None

    def due(self, now: float) -> list:
        out = []
        while self._held and self._held[0][0] <= now:
            out.append(heapq.heappop(self._held)[2])
        return out
