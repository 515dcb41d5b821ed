"""Disk fault and recording components chosen by config, for tests: never monkeypatching.

`DiskFaults` is the `DiskIO` (roles/durable.py) of every durable write the
node makes (chunks, manifests, directories), and `before_log_write` is the
hook of the ownership logs. Each fault is off unless configured:

- `write_rate`: writes are paced to this many bytes per second across all
  store threads (a slow disk);
- `fail_at_write`: the Nth write (counting from 1) fails with EIO, once (a
  disk error mid-transfer);
- `capacity`: once this many bytes have been written by this process, every
  further write fails with ENOSPC (a disk that fills up; restart the worker
  with a larger capacity, or none, to give the space back);
- `fail_at_read`: the Nth chunk read of a restore (counting from 1) fails
  with EIO, once (`before_read`, the restore pump's read hook).
- `log_capacity`: the same for the ownership logs alone (their own count), so
  a test can fill the disk under the logs while chunks still fit;
- `manifest_errors`: the first N manifest writes fail with EIO (a commit
  whose manifest cannot be saved);
- `gc_slice_ms`: each garbage collection slice waits this long on its store
  thread first (`before_gc_slice`), so a test can race a run or kill the
  node in the middle of one;
- `sync_log`: a file that gets one line per durable step as it happens:
  `fsync file <path>`, `fsync dir <path>`, `rename <src> <dst>`,
  `link <src> <dst>`, `mkdir <path>`. The fsync lines are written by the
  fsync itself, after it returned, and name what the kernel says the
  descriptor is (/proc/self/fd), so a test reading them sees the syncs that
  really happened, in order.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from bus.pacing import BlockingPacer
from roles.durable import DiskIO


def _real(path) -> str:
    return os.path.realpath(path)


class DiskFaults(DiskIO):
    def __init__(self, write_rate: int | None = None, fail_at_write: int = 0, capacity: int | None = None,
                 fail_at_read: int = 0, log_capacity: int | None = None, manifest_errors: int = 0,
                 sync_log: str = "", gc_slice_ms: int = 0, clock=time.monotonic, sleep=time.sleep):
        self.gc_slice_s = gc_slice_ms / 1000
        self._sleep = sleep
        self.write_rate = write_rate
        self.fail_at_write = fail_at_write
        self.capacity = capacity
        self.fail_at_read = fail_at_read
        self.reads = 0
        self.log_capacity = log_capacity
        self.manifest_errors = manifest_errors
        self._pacer = BlockingPacer(write_rate, clock, sleep)
        self._lock = threading.Lock()
        self.writes = 0
        self.bytes_written = 0
        self.log_bytes_written = 0
        self._sync_fd = (os.open(sync_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                         if sync_log else None)

    @property
    def active(self) -> bool:
        return (self.write_rate is not None or self.fail_at_write > 0 or self.capacity is not None
                or self.log_capacity is not None or self.manifest_errors > 0 or self._sync_fd is not None)

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

    def before_gc_slice(self) -> None:
        self._sleep(self.gc_slice_s)

    def before_log_write(self, nbytes: int) -> None:
        with self._lock:
            if self.log_capacity is not None and self.log_bytes_written + nbytes > self.log_capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.log_bytes_written += nbytes

    def before_manifest_write(self, nbytes: int) -> None:
        with self._lock:
            if self.manifest_errors > 0:
                self.manifest_errors -= 1
                raise OSError(errno.EIO, "injected manifest write error")

    # --- recording (sync_log) ---------------------------------------------------------

    def _record(self, line: str) -> None:
        if self._sync_fd is not None:
            os.write(self._sync_fd, (line + "\n").encode())  # O_APPEND: whole lines, across threads

    def fsync(self, fd: int) -> None:
        super().fsync(fd)  # the plain one, as without faults; then the record
        if self._sync_fd is not None:
            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            self._record(f"fsync {kind} {os.readlink(f'/proc/self/fd/{fd}')}")

    def rename(self, src, dst) -> None:
        super().rename(src, dst)
        self._record(f"rename {_real(src)} {_real(dst)}")

    def link(self, src, dst) -> None:
        super().link(src, dst)
        self._record(f"link {_real(src)} {_real(dst)}")

    def mkdir(self, path) -> None:
        super().mkdir(path)
        self._record(f"mkdir {_real(path)}")

    def close(self) -> None:
        if self._sync_fd is not None:
            os.close(self._sync_fd)
            self._sync_fd = None
