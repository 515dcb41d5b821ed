"""CPU and disk work off the poll loop: a thread pool whose results come back
through a pipe the loop polls.

The loop submits `(key, fn, args)`; a worker thread runs it (hashing,
compression, fsync all release the GIL, so this uses every core) and puts
`(key, result, error)` on a completion queue, then writes a byte to a pipe.
The loop polls the pipe's read end beside its sockets and drains `done()`.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor


class TaskPool:
    def __init__(self, threads: int, name: str = "work"):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._completed: deque = deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.pending = 0
        self.threads = threads

    @property
    def fileno(self) -> int:
        return self._read_fd

    def submit(self, key, fn, *args) -> None:
        self.pending += 1
        self._executor.submit(self._run, key, fn, args)

    def _run(self, key, fn, args) -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # reported to the loop, never lost in a thread
            result, error = None, exc
        self._completed.append((key, result, error))
        try:
            os.write(self._write_fd, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the loop will drain

    def done(self) -> list:
        """Completed tasks since last call, in completion order (loop thread only)."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._completed:
            out.append(self._completed.popleft())
        self.pending -= len(out)
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        os.close(self._read_fd)
        os.close(self._write_fd)
