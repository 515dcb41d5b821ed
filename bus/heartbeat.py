"""Liveness in the Paranoid Pirate style, with time as an argument.

Every message from a peer counts as a sign of life. A peer silent for
`liveness` intervals is dead. We send a HEARTBEAT when we have sent nothing
else for one interval.
"""

from __future__ import annotations

import random


class Liveness:
    def __init__(self, interval_s: float, liveness: int, now: float):
        self.interval_s = interval_s
        self.liveness = liveness
        self.last_heard = now
        self.last_sent = now

    def heard(self, now: float) -> None:
        self.last_heard = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    def is_dead(self, now: float) -> bool:
        return now - self.last_heard > self.interval_s * self.liveness

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval_s

    def next_deadline(self, now: float) -> float:
        """Seconds until this peer needs attention (a heartbeat or a death check)."""
        due = self.last_sent + self.interval_s
        death = self.last_heard + self.interval_s * self.liveness
        return max(0.0, min(due, death) - now)


class Backoff:
    """Reconnect delays: doubling from `initial_s` up to `max_s`, reset on success.

    Each delay is jittered ("equal jitter": half fixed, half uniform), so the
    thousands of devices that lost one broker at the same instant do not
    come back at the same instant: a restart is no thundering herd. `rng`
    is injectable for tests (any object with `random()`).
    """

    def __init__(self, initial_s: float = 0.25, max_s: float = 8.0, rng=None):
        self.initial_s = initial_s
        self.max_s = max_s
        self.current_s = initial_s
        self._rng = rng if rng is not None else random.Random()

    def next_delay(self) -> float:
        delay = self.current_s
        self.current_s = min(self.max_s, self.current_s * 2)
        return delay / 2 + self._rng.random() * delay / 2

    def reset(self) -> None:
        self.current_s = self.initial_s
