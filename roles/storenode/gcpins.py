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

Releasing a million-name upload is a million decrements: `release` only
queues them, and the core drains `RELEASE_BATCH` names per loop wake-up
(`drain`), so no commit stalls the loop. Until drained a name stays pinned,
which only keeps it longer.

The loop pins, releases and drains; a store thread asks `protected` under `lock`.
"""

from __future__ import annotations

import threading
from collections import Counter, deque

RELEASE_BATCH = 4096  # names un-pinned per loop wake-up


class Pins:
    def __init__(self):
        self.lock = threading.Lock()
        self._count: Counter = Counter()  # name -> open uploads holding it
        self._sessions: dict[str, tuple[str, set]] = {}  # transfer id -> (device, its distinct names)
        self._by_device: dict[str, dict] = {}  # device -> {transfer id: None}
        self._releasing: deque = deque()  # (device, names, iterator over them) of ended uploads
        self._running = False
        self._released: set = set()  # un-pinned during the current run (all devices)
        self._released_by_device: dict[str, list] = {}  # device -> name sets of its uploads ended this run

    def pin(self, transfer_id: str, device: str, names) -> None:
        """Loop thread: hold a QUERY slice's names (nil names are zero chunks: nothing to hold)."""
        entry = self._sessions.get(transfer_id)
        if entry is None:
            entry = self._sessions[transfer_id] = (device, set())
            self._by_device.setdefault(device, {})[transfer_id] = None
        held = entry[1]
        new = set(names)
        new.discard(None)
        new -= held
        held |= new
        with self.lock:
            self._count.update(new)

    def release(self, transfer_id: str) -> None:
        """Loop thread: the upload ended; its names are un-pinned by `drain`, and held to the end of a
        run in progress."""
        entry = self._sessions.pop(transfer_id, None)
        if entry is None:
            return
        device, held = entry
        sessions = self._by_device[device]
        del sessions[transfer_id]
        if not sessions:
            del self._by_device[device]
        if held:
            self._releasing.append((device, held, iter(held)))
            if self._running:
                self._released_by_device.setdefault(device, []).append(held)

    def drain(self, limit: int = RELEASE_BATCH) -> bool:
        """Loop thread: un-pin up to `limit` names of ended uploads; True while more are queued."""
        with self.lock:
            while limit > 0 and self._releasing:
                names = self._releasing[0][2]
                for name in names:
                    count = self._count[name] - 1
                    if count:
                        self._count[name] = count
                    else:
                        del self._count[name]
                        if self._running:
                            self._released.add(name)
                    limit -= 1
                    if not limit:
                        break
                else:
                    self._releasing.popleft()
            return bool(self._releasing)

    def protected(self, name: bytes) -> bool:
        """A store thread, holding `lock`: may the sweep not delete this name?"""
        return name in self._count or name in self._released

    def held_by(self, device: str) -> list:
        """Loop thread: the name sets of the device's open uploads, and of its uploads that ended
        this run or are still being un-pinned (for set operations: no walk in Python)."""
        sets = [self._sessions[transfer_id][1] for transfer_id in self._by_device.get(device, ())]
        sets += self._released_by_device.get(device, ())
        sets += [names for owner, names, _ in self._releasing if owner == device]
        return sets

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
