"""`limit: yield`: take only what the office link leaves, in the spirit of LEDBAT.

Theory of operation (RFC 6817, adapted to a paced rate instead of a window):
the agent pings the broker every `probe_interval_s` on its own connection;
the round-trip time of the fastest recent pings over the base delay (the
least seen in the last minutes) is the queueing delay on the path. Under
`target_s` the rate grows (faster the further under); over it the rate
shrinks multiplicatively, so a queue that someone else's traffic builds
pushes us down to `min_rate` within a few probes. Every `slowdown_every_s`
the rate drops to the floor for a moment so that queues drain and the base
delay is measured again (LEDBAT++'s periodic slowdown): otherwise a queue we
built ourselves would become our idea of an empty path.
"""

from __future__ import annotations

from collections import deque

MIN_RATE = 32 * 1024
MAX_RATE = 10 * 1024**3


class YieldController:
    def __init__(self, now: float, target_s: float = 0.025, start_rate: int = 256 * 1024,
                 probe_interval_s: float = 0.1, base_history_s: float = 120.0, slowdown_every_s: float = 20.0,
                 slowdown_s: float = 0.3):
        self.target_s = target_s
        self.rate = float(start_rate)
        self.probe_interval_s = probe_interval_s
        self.base_history_s = base_history_s
        self.slowdown_every_s = slowdown_every_s
        self.slowdown_s = slowdown_s
        self._base: deque = deque()  # (bucket start, min rtt in bucket), 10 s buckets
        self._recent: deque = deque(maxlen=3)
        self.next_probe = now
        self.next_slowdown = now + slowdown_every_s
        self.slowdown_until = 0.0
        self.queue_delay_s = 0.0
        self.last_update = now

    @property
    def base_delay_s(self) -> float | None:
        return min((rtt for _, rtt in self._base), default=None)

    def probe_due(self, now: float) -> bool:
        return now >= self.next_probe

    def probe_sent(self, now: float) -> None:
        self.next_probe = now + self.probe_interval_s

    def on_rtt(self, rtt_s: float, now: float) -> None:
        bucket = now - now % 10.0
        if self._base and self._base[-1][0] == bucket:
            self._base[-1] = (bucket, min(self._base[-1][1], rtt_s))
        else:
            self._base.append((bucket, rtt_s))
        while self._base and self._base[0][0] < now - self.base_history_s:
            self._base.popleft()
        self._recent.append(rtt_s)
        self.queue_delay_s = max(0.0, min(self._recent) - self.base_delay_s)
        off_target = (self.target_s - self.queue_delay_s) / self.target_s
        dt = max(0.0, min(1.0, now - self.last_update))
        self.last_update = now
        # Proportional to how far off target, both ways, per second of time
        # (not per probe): up to about e-fold a second when the path is empty,
        # down as fast when a queue twice the target builds; gentle near it.
        step = dt * max(-1.0, min(1.0, off_target))
        self.rate *= 1.0 + step
        if off_target > 0:
            self.rate += 64 * 1024 * dt
        self.rate = max(MIN_RATE, min(MAX_RATE, self.rate))

    def current_rate(self, now: float) -> int:
        if now >= self.next_slowdown:
            self.slowdown_until = now + self.slowdown_s
            self.next_slowdown = now + self.slowdown_every_s
            self._recent.clear()
        if now < self.slowdown_until:
            return MIN_RATE
        return int(self.rate)
