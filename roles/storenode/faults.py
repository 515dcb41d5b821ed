"""Disk fault components chosen by config, for tests: never monkeypatching.

`DiskFaults.before_write(nbytes)` is the write hook of every durable write
(chunks and manifests). Each fault is off unless configured:

- `write_rate`: writes are paced to this many bytes per second across all
  store threads (a slow disk);
- `fail_at_write`: the Nth write (counting from 1) fails with EIO, once (a
  disk error mid-transfer);
- `capacity`: once this many bytes have been written by this process, every
  further write fails with ENOSPC (a disk that fills up; restart the worker
  with a larger capacity, or none, to give the space back);
- `fail_at_read`: the Nth chunk read of a restore (counting from 1) fails
  with EIO, once (`before_read`, the restore pump's read hook).
"""

from __future__ import annotations

import errno
import os
import threading
import time

from bus.pacing import BlockingPacer


class DiskFaults:
    def __init__(self, write_rate: int | None = None, fail_at_write: int = 0, capacity: int | None = None,
                 fail_at_read: int = 0, clock=time.monotonic, sleep=time.sleep):
        self.write_rate = write_rate
        self.fail_at_write = fail_at_write
        self.capacity = capacity
        self.fail_at_read = fail_at_read
        self.reads = 0
        self._pacer = BlockingPacer(write_rate, clock, sleep)
        self._lock = threading.Lock()
        self.writes = 0
        self.bytes_written = 0

    @property
    def active(self) -> bool:
        return self.write_rate is not None or self.fail_at_write > 0 or self.capacity is not None

    def before_write(self, nbytes: int) -> None:
        with self._lock:
            self.writes += 1
            if self.writes == self.fail_at_write:
                raise OSError(errno.EIO, f"injected disk error at write {self.writes}")
            if self.capacity is not None and self.bytes_written + nbytes > self.capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.bytes_written += nbytes
        self._pacer.acquire(nbytes)

    def before_read(self) -> None:
        with self._lock:
            self.reads += 1
            if self.reads == self.fail_at_read:
                raise OSError(errno.EIO, f"injected disk error at read {self.reads}")
