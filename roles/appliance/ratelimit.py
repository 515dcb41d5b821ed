"""Pacing what the agent puts on the wire: a token bucket with a small burst.

Time is an argument. `rate` is bytes per second (None: unlimited). The bucket
holds at most `burst` bytes, so the sender never bursts above the cap for
longer than one small piece: callers send pieces of at most `piece_size`
bytes and ask `wait_s(n, now)` before each. The burst (20 ms of the rate) is a few pieces
deep, so a loop turn that runs late does not lose its tokens, and no 100 ms
interval can carry more than 120% of the rate.
"""

from __future__ import annotations

MIN_BURST = 16 * 1024


class TokenBucket:
    def __init__(self, rate: int | None, now: float, burst_s: float = 0.02, piece_s: float = 0.005):
        self.burst_s = burst_s
        self.piece_s = piece_s
        self.rate: int | None = None
        self.tokens = 0.0
        self.stamp = now
        self.set_rate(rate, now)

    @property
    def burst(self) -> float:
        return max(MIN_BURST, (self.rate or 0) * self.burst_s)

    def set_rate(self, rate: int | None, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if self.rate is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, nbytes: int, now: float) -> float:
        """Seconds until `nbytes` may go (0 when they may go now)."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        # A piece larger than the burst goes once the bucket is full; the debt
        # it leaves (negative tokens) delays the next one: the long-run rate holds.
        need = min(nbytes, self.burst)
        if self.tokens + 1.0 >= need:  # a byte's worth of slack absorbs float rounding
            return 0.0
        return (need - self.tokens) / self.rate

    def spend(self, nbytes: int, now: float) -> None:
        if self.rate is None:
            return
        self._refill(now)
        self.tokens -= nbytes

    def piece_size(self, default: int) -> int:
        """How big a piece to send at this rate: about 5 ms of it, 16 KiB at least.
        The bucket holds a few pieces, so a loop turn that runs late loses nothing."""
        if self.rate is None:
            return default
        return int(max(MIN_BURST, min(default, self.rate * self.piece_s)))
