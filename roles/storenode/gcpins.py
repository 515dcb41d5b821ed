"""The chunk names open uploads hold, which garbage collection must not sweep.

Theory of operation: an upload pins every name of each QUERY slice (on the
loop, before the store pool stats any of them), and releases them all when
it ends (commit, abort, idle, a broker restart). Pinning before the stat is
what makes negotiation safe: the sweep checks a name and unlinks its file
under the same lock, so a stat that comes after the pin sees the file the
upload will be told is present, or sees it gone and the chunk is asked for.
A name the upload is asked to send is pinned too, so that a sweep never
unlinks a file a store thread has just found present (chunkstore.store then
writes only a copy beside it).

A GC run is one epoch: every name released while it runs is held until it
ends (`released`), so a chunk stored, or reported present, after the mark
began survives the sweep even when its upload committed in between (its
manifest may have landed after the mark read that device). The same held
names, by device, are what the ownership compaction keeps (gc.py).

The loop pins and releases; a store thread asks `protected` under `lock`.
"""

from __future__ import annotations

import threading


class Pins:
    def __init__(self):
        self.lock = threading.Lock()
        self._count: dict[bytes, int] = {}  # name -> open uploads holding it
        self._sessions: dict[str, tuple[str, set]] = {}  # transfer id -> (device, its distinct names)
        self._by_device: dict[str, dict] = {}  # device -> {transfer id: None}
        self._running = False
        self._released: set = set()  # released during the current run (all devices)
        self._released_by_device: dict[str, set] = {}

    def pin(self, transfer_id: str, device: str, names) -> None:
        """Loop thread: hold a QUERY slice's names (nil names are zero chunks: nothing to hold)."""
        entry = self._sessions.get(transfer_id)
        if entry is None:
            entry = self._sessions[transfer_id] = (device, set())
            self._by_device.setdefault(device, {})[transfer_id] = None
        held = entry[1]
        with self.lock:
            for name in names:
                if name is not None and name not in held:
                    held.add(name)
                    self._count[name] = self._count.get(name, 0) + 1

    def release(self, transfer_id: str) -> None:
        """Loop thread: the upload ended; what it held is held to the end of a run in progress."""
        entry = self._sessions.pop(transfer_id, None)
        if entry is None:
            return
        device, held = entry
        sessions = self._by_device[device]
        del sessions[transfer_id]
        if not sessions:
            del self._by_device[device]
        with self.lock:
            for name in held:
                count = self._count[name] - 1
                if count:
                    self._count[name] = count
                else:
                    del self._count[name]
            if self._running:
                self._released |= held
                self._released_by_device.setdefault(device, set()).update(held)

    def protected(self, name: bytes) -> bool:
        """A store thread, holding `lock`: may the sweep not delete this name?"""
        return name in self._count or name in self._released

    def held_by(self, device: str):
        """Loop thread: the names the device's open uploads hold, and those it released this run."""
        for transfer_id in self._by_device.get(device, ()):
            yield from self._sessions[transfer_id][1]
        yield from self._released_by_device.get(device, ())

    def begin_run(self) -> None:
        with self.lock:
            self._running = True
            self._released, self._released_by_device = set(), {}

    def end_run(self) -> None:
        with self.lock:
            self._running = False
            self._released, self._released_by_device = set(), {}

    def __len__(self) -> int:
        return len(self._count)
