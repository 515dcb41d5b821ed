"""Disk fault components chosen by config, for tests: never monkeypatching.

`DiskFaults.before_write(nbytes)` is the write hook of every durable write.
With `write_rate` set, writes are paced to that many bytes per second across
all store threads (a slow disk).
"""

from __future__ import annotations

import threading
import time


class DiskFaults:
    def __init__(self, write_rate: int | None = None, clock=time.monotonic, sleep=time.sleep):
        self.write_rate = write_rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_free = 0.0

    @property
    def active(self) -> bool:
        return self.write_rate is not None

    def before_write(self, nbytes: int) -> None:
        if self.write_rate is None:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + nbytes / self.write_rate
            wait = self._next_free - now
        if wait > 0:
            self._sleep(wait)
