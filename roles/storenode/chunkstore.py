"""Content-addressed chunk store: each distinct chunk once, verified, durable.

Layout: `<root>/chunks/<hh>/<hash hex>` where `hh` is the first two hex
digits. A chunk file is an 8-byte header (magic `SC`, format 1, codec,
raw length) and the chunk as it travelled (zstd or raw), so a restore sends
it back without recompressing. `put` verifies the bytes against their name
before anything touches the disk.

No dedup timing signal. A chunk new to the uploading device is written
durably even when its file is already on disk (another device stored it):
the same verified bytes go through the same `write_durable` a new chunk
takes (create, write, fsync, rename to a name that did not exist, fsync
the directory), under a fresh "copy" name beside the chunk file. STORED then
costs a real write of that chunk, because it is one, so its timing cannot
tell a device that someone else holds this content (DESIGN.md: negotiation
is per device). Renaming the copy over the existing file would be the same
write plus freeing the old file's blocks, measurably slower (bench/timing.py),
a signal of its own; so the copy keeps its own name and `reap()`, run by the
node on its space timer, off every STORED path, removes the copies in a
batch. The price is a write per (device, chunk) rather than per chunk; the
disk keeps one copy. The copy's directory fsync also makes the chunk's own
name durable before STORED, whichever thread renamed it (its rename is
done: the file was seen). The 256 `<hh>` directories are made at start, so
no first chunk of a directory pays a mkdir the others do not.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from bus.errors import RequestError
from roles.chunkdata import decode_and_verify, pack_chunk_header, parse_chunk_file
from roles.durable import PLAIN, DiskIO, make_subdirs, write_durable

SUBDIRS = tuple(f"{i:02x}" for i in range(256))
COPY_SUFFIX = ".copy"  # the write-shaped copy of a chunk already stored, until reap() removes it


class ChunkStore:
    def __init__(self, root: str | os.PathLike, io: DiskIO = PLAIN):
        self.root = Path(root) / "chunks"
        self.io = io
        make_subdirs(self.root, SUBDIRS, io)
        self._copies: list[Path] = []  # appended by store threads, taken by reap()
        self._copies_lock = threading.Lock()

    def path_for(self, name: bytes) -> Path:
        hexname = name.hex()
        return self.root / hexname[:2] / hexname

    def has(self, name: bytes) -> bool:
        return self.path_for(name).exists()

    def put(self, name: bytes, raw_len: int, codec: str, payload) -> bytes:
        """Verify and store durably (unless already stored); returns the raw bytes.

        Runs on a store thread. Raises RequestError(bad_chunk) when the bytes
        do not match the name: nothing is written then.
        """
        return self.store(name, raw_len, codec, payload)[0]

    def store(self, name: bytes, raw_len: int, codec: str, payload) -> tuple[bytes, int]:
        """`put`, and how many payload bytes it added: 0 if the chunk's file was there already
        (it is rewritten all the same: see the module's doc)."""
        raw = decode_and_verify(codec, payload, raw_len, name)
        path = self.path_for(name)
        existed = path.exists()
        target = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{COPY_SUFFIX}") if existed else path
        header = pack_chunk_header(codec, raw_len)  # path.parent is one of the SUBDIRS made at start
        write_durable(target, [header, payload], io=self.io)
        if existed:
            with self._copies_lock:
                self._copies.append(target)
            return raw, 0
        return raw, len(payload)

    def reap(self, everything: bool = False) -> int:
        """Remove the copies `store` left; with `everything`, any on disk too (a crash's, at start).
        Returns how many. On a store thread, never on a STORED's path."""
        with self._copies_lock:
            copies, self._copies = self._copies, []
        if everything:
            copies = [Path(entry.path) for sub in SUBDIRS for entry in os.scandir(self.root / sub)
                      if entry.name.endswith(COPY_SUFFIX)]
        for copy in copies:
            copy.unlink(missing_ok=True)
        return len(copies)

    def count(self) -> int:
        """Chunk files on disk (a walk of the store: at start, before the loop runs)."""
        return sum(1 for sub in self.root.iterdir() if sub.is_dir()
                   for entry in os.scandir(sub) if entry.is_file() and len(entry.name) == 64)

    def read_stored(self, name: bytes) -> tuple[str, int, bytes]:
        """(codec, raw_len, payload) as stored; RequestError(not_found/storage_error)."""
        try:
            blob = self.path_for(name).read_bytes()
        except FileNotFoundError:
            raise RequestError(f"chunk {name.hex()[:16]} is not stored", "not_found") from None
        try:
            codec, raw_len, payload = parse_chunk_file(blob)
        except ValueError as exc:
            raise RequestError(f"chunk {name.hex()[:16]}: {exc}", "storage_error") from None
        return codec, raw_len, bytes(payload)

    def read_raw(self, name: bytes) -> bytes:
        """The chunk's raw bytes, verified against its name."""
        codec, raw_len, payload = self.read_stored(name)
        try:
            return decode_and_verify(codec, payload, raw_len, name)
        except RequestError:
            raise RequestError(f"chunk {name.hex()[:16]} is damaged", "storage_error") from None

    def space(self) -> tuple[int, int]:
        """(free_bytes, used_bytes) of the store's filesystem."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return free, used
