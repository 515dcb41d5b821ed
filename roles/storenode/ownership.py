"""Which chunks each device has stored: the scope of negotiation.

"Which of these do you lack" is answered from the asking device's own set,
so no device learns whether another's data exists; on disk a chunk is kept
once. The sets are rebuilt at start from committed manifests and from an
append-only log per device of chunks stored since. The log is not fsync'd per
entry: losing its tail only makes a device send a chunk again, never loses
data (the chunk file itself is durable before STORED).
"""

from __future__ import annotations

import os
from pathlib import Path

HASH_LEN = 32


class DeviceChunks:
    def __init__(self, root: str | os.PathLike, committed_chunks=None):
        # committed_chunks(device_id) -> iterable of chunk names in its manifests
        self._committed_chunks = committed_chunks
        self.root = Path(root) / "owners"
        self.root.mkdir(parents=True, exist_ok=True)
        self._sets: dict[str, set] = {}
        self._logs: dict[str, object] = {}

    def _load(self, device_id: str) -> set:
        owned = self._sets.get(device_id)
        if owned is None:
            owned = set()
            path = self.root / f"{device_id}.log"
            if path.exists():
                blob = path.read_bytes()
                whole = len(blob) - len(blob) % HASH_LEN  # a torn last entry is ignored
                owned.update(blob[i:i + HASH_LEN] for i in range(0, whole, HASH_LEN))
            if self._committed_chunks is not None:
                owned.update(name for name in self._committed_chunks(device_id) if name is not None)
            self._sets[device_id] = owned
        return owned

    def owns(self, device_id: str, name: bytes) -> bool:
        return name in self._load(device_id)

    def add(self, device_id: str, name: bytes) -> None:
        owned = self._load(device_id)
        if name in owned:
            return
        owned.add(name)
        log = self._logs.get(device_id)
        if log is None:
            log = self._logs[device_id] = open(self.root / f"{device_id}.log", "ab", buffering=64 * 1024)
        log.write(name)

    def add_many(self, device_id: str, names) -> None:
        for name in names:
            self.add(device_id, name)

    def flush(self) -> None:
        for log in self._logs.values():
            log.flush()

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()
