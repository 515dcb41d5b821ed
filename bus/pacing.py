"""A thread-safe pacer for disk I/O done on pool threads: callers block
(on their own thread, never the loop's) until their bytes fit the rate."""

from __future__ import annotations

import threading
import time


class BlockingPacer:
    def __init__(self, rate: int | None, clock=time.monotonic, sleep=time.sleep):
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_free = 0.0

    def acquire(self, nbytes: int) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + nbytes / self.rate
            wait = start - now
        if wait > 0:
            self._sleep(wait)
