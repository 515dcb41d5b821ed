"""Which chunks each device has stored: the scope of negotiation.

"Which of these do you lack" is answered from the asking device's own set,
so no device learns whether another's data exists; on disk a chunk is kept
once. The sets are rebuilt at start from committed manifests and from an
append-only log per device of chunks stored since. The log is not fsync'd per
entry: losing its tail only makes a device send a chunk again, never loses
data (the chunk file itself is durable before STORED).

Each record goes to the OS when the chunk is stored (one 32-byte write, no
buffer), so a failing disk fails that chunk's STORED, not a later flush that
nobody can attribute. A failed or short write is cut back to the last whole
record: a torn record in the middle would shift every later one. At most
`log_handles` logs are open at once (least recently used closed first), so
a node that has seen any number of devices does not run out of descriptors;
the pool never takes more than a quarter of the process's descriptor limit
(RLIMIT_NOFILE), leaving the rest to chunk writes and sockets. If the process
runs out all the same (EMFILE), the pool gives back half its handles and
tries once more.

Garbage collection (gc.py) compacts a device's log: it is replaced whole,
durably (write, fsync, rename, fsync the directory), by the names the
device still needs from it, those its manifests do not already give at
load (gc.py says which). While the new log is written on a store thread,
the device's appends wait in memory and follow it once it is in place; a
crash meanwhile leaves the old log, a superset, and loses only that tail.
"""


from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from pathlib import Path

from bus.errors import RequestError
from roles.durable import PLAIN, DiskIO, make_dirs, write_durable

HASH_LEN = 32
LOG_HANDLES = 256  # the storage config's owner_log_handles default
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class LogHandles:
    """Append handles to the ownership logs, at most `limit` open."""

    def __init__(self, root: Path, limit: int = LOG_HANDLES, write_hook=None):
        if limit < 1:
            raise ValueError("log handle limit must be at least 1")
        self.root = root
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = limit if soft == resource.RLIM_INFINITY else max(1, min(limit, soft // 4))
        self._write_hook = write_hook
        self._open: OrderedDict[str, list] = OrderedDict()  # device -> [fd, size], least recent first

    def __len__(self) -> int:
        return len(self._open)

    def append(self, device_id: str, record: bytes) -> None:
        """Append one whole record to the device's log, or raise OSError with the log unchanged."""
        entry = self._entry(device_id)
        fd, size = entry
        try:
            if self._write_hook is not None:
                self._write_hook(len(record))
            written = os.write(fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            self._discard(device_id, size)
            raise
        entry[1] = size + written

    def _entry(self, device_id: str) -> list:
        entry = self._open.get(device_id)
        if entry is not None:
            self._open.move_to_end(device_id)
            return entry
        while len(self._open) >= self.limit:
            self._close_oldest()
        try:
            fd = self._open_log(device_id)
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS or not self._open:
                raise
            for _ in range((len(self._open) + 1) // 2):
                self._close_oldest()
            fd = self._open_log(device_id)
        size = os.fstat(fd).st_size
        whole = size - size % HASH_LEN
        if whole != size:  # a torn last record (a crash mid-write): appending after it would misalign
            os.ftruncate(fd, whole)
        entry = self._open[device_id] = [fd, whole]
        return entry

    def _open_log(self, device_id: str) -> int:
        return os.open(self.root / f"{device_id}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o644)

    def _discard(self, device_id: str, size: int) -> None:
        """After a failed write: cut the log back to `size` if possible, and close it either way
        (reopening rounds a torn tail down to whole records)."""
        fd, _ = self._open.pop(device_id)
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        os.close(fd)

    def forget(self, device_id: str) -> None:
        """Close the device's log if open (it is about to be replaced)."""
        entry = self._open.pop(device_id, None)
        if entry is not None:
            os.close(entry[0])

    def _close_oldest(self) -> None:
        _, (fd, _) = self._open.popitem(last=False)
        os.close(fd)

    def close(self) -> None:
        while self._open:
            self._close_oldest()


class DeviceChunks:
    def __init__(self, root: str | os.PathLike, committed_chunks=None, *, log_handles: int = LOG_HANDLES,
                 write_hook=None, io: DiskIO = PLAIN):
        # committed_chunks(device_id) -> iterable of chunk names in its manifests
        self._committed_chunks = committed_chunks
        self.root = Path(root) / "owners"
        make_dirs(self.root, io)
        self._sets: dict[str, set] = {}
        self.logs = LogHandles(self.root, log_handles, write_hook)
        self.io = io
        self._rewriting: dict[str, list] = {}  # device -> names added while its log is replaced

    def load(self, device_id: str) -> set:
        """The device's set, read from disk the first time; RequestError(storage_error) if unreadable."""
        owned = self._sets.get(device_id)
        if owned is None:
            try:
                owned = self._read(device_id)
            except OSError as exc:
                raise RequestError(f"ownership of {device_id} could not be read: {exc.strerror or exc}",
                                   "storage_error") from None
            self._sets[device_id] = owned
        return owned

    def _read(self, device_id: str) -> set:
        owned = set()
        path = self.root / f"{device_id}.log"
        if path.exists():
            blob = path.read_bytes()
            whole = len(blob) - len(blob) % HASH_LEN  # a torn last entry is ignored
            owned.update(blob[i:i + HASH_LEN] for i in range(0, whole, HASH_LEN))
        if self._committed_chunks is not None:
            owned.update(name for name in self._committed_chunks(device_id) if name is not None)
        return owned

    def owns(self, device_id: str, name: bytes) -> bool:
        return name in self.load(device_id)

    def add(self, device_id: str, name: bytes) -> None:
        """Record that the device stored `name`. OSError (the log could not be written) leaves
        both the log and the set unchanged: the device will be asked for the chunk again."""
        owned = self.load(device_id)
        if name in owned:
            return
        pending = self._rewriting.get(device_id)
        if pending is not None:
            pending.append(name)
        else:
            self.logs.append(device_id, name)
        owned.add(name)

    def add_many(self, device_id: str, names) -> None:
        for name in names:
            self.add(device_id, name)

    # --- compaction (gc.py): the loop calls begin/end, a store thread write_log ------

    def devices_loaded(self):
        return self._sets.keys()

    def loaded(self, device_id: str) -> set | None:
        """The device's set if it is in memory (no disk read)."""
        return self._sets.get(device_id)

    def replace(self, device_id: str, owned: set) -> None:
        self._sets[device_id] = owned

    def begin_rewrite(self, device_id: str) -> None:
        self.logs.forget(device_id)
        self._rewriting[device_id] = []

    def write_log(self, device_id: str, names) -> None:
        """On a store thread, between begin_rewrite and end_rewrite: the log becomes `names`
        (no write when it holds exactly that already, or is absent and should be empty)."""
        path, blob = self.root / f"{device_id}.log", b"".join(names)
        try:
            if path.stat().st_size == len(blob) and path.read_bytes() == blob:
                return
        except FileNotFoundError:
            if not blob:
                return
        write_durable(path, [blob], io=self.io)

    def end_rewrite(self, device_id: str) -> None:
        """Append what came meanwhile to whichever log is in place (the new one, or the old one
        if the write failed). A failed append loses only log tail, as any append's failure would."""
        for name in self._rewriting.pop(device_id, ()):
            try:
                self.logs.append(device_id, name)
            except OSError:
                return

    def close(self) -> None:
        self.logs.close()
