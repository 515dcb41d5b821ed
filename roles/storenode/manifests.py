"""Committed snapshot manifests, one durable msgpack file each.

`<root>/manifests/<device>/<dataset>/<snapshot>.manifest` holds the ordered
chunk names (None for an all-zero chunk) and the whole-image blake3. Ids are
validated by the schema before they reach here; `_path` checks again because
a path is the last line of defence.

A committed manifest is never overwritten: saving one that exists with
other content is refused (`conflict`), the same content again is a no-op;
the file is linked into place, so even two savers racing cannot replace it.
Only the broker's retention removes one (`remove`, for PRUNE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from bus.errors import RequestError
from roles.geometry import ImageGeometry
from roles.durable import PLAIN, DiskIO, fsync_dir, make_dirs, write_durable
from schemas import is_valid_id


@dataclass(frozen=True)
class Manifest:
    device_id: str
    dataset: str
    snapshot: str
    image_size: int
    chunk_size: int
    image_blake3: bytes
    chunks: tuple  # chunk names in order; None marks an all-zero chunk

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(self.image_size, self.chunk_size)

    def chunk_len(self, index: int) -> int:
        return self.geometry.chunk_len(index)

    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "format": 1, "device_id": self.device_id, "dataset": self.dataset, "snapshot": self.snapshot,
            "image_size": self.image_size, "chunk_size": self.chunk_size,
            "image_blake3": self.image_blake3, "chunks": list(self.chunks),
        }, use_bin_type=True)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Manifest":
        d = msgpack.unpackb(blob, raw=False)
        return cls(d["device_id"], d["dataset"], d["snapshot"], d["image_size"], d["chunk_size"],
                   d["image_blake3"], tuple(d["chunks"]))


def same_content(existing: Manifest, manifest: Manifest) -> bool:
    """The same snapshot: geometry, chunk names, and the blake3 unless the new one has none yet."""
    return (existing.image_size == manifest.image_size and existing.chunk_size == manifest.chunk_size
            and tuple(existing.chunks) == tuple(manifest.chunks)
            and manifest.image_blake3 in (None, existing.image_blake3))


def conflict(manifest: Manifest) -> RequestError:
    return RequestError(f"{manifest.dataset}/{manifest.snapshot} is stored with other content", "conflict")


class ManifestStore:
    def __init__(self, root: str | os.PathLike, write_hook=None, io: DiskIO = PLAIN):
        self.write_hook = write_hook
        self.io = io
        self.root = Path(root) / "manifests"
        make_dirs(self.root, io)

    def _path(self, device_id: str, dataset: str, snapshot: str) -> Path:
        for value in (device_id, dataset, snapshot):
            if not is_valid_id(value):
                raise RequestError(f"invalid id {value!r}", "bad_id")
        return self.root / device_id / dataset / f"{snapshot}.manifest"

    def save(self, manifest: Manifest) -> None:
        """Durably; RequestError(conflict) if the snapshot is stored with other content."""
        path = self._path(manifest.device_id, manifest.dataset, manifest.snapshot)
        make_dirs(path.parent, self.io)
        try:
            write_durable(path, [manifest.to_bytes()], self.write_hook, io=self.io, replace=False)
        except FileExistsError:
            existing = self.load(manifest.device_id, manifest.dataset, manifest.snapshot)
            if not same_content(existing, manifest):
                raise conflict(manifest) from None

    def load(self, device_id: str, dataset: str, snapshot: str) -> Manifest:
        path = self._path(device_id, dataset, snapshot)
        try:
            return Manifest.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise RequestError(f"snapshot {dataset}/{snapshot} is not stored here", "not_found") from None
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            raise RequestError(f"manifest of {dataset}/{snapshot} is damaged", "storage_error") from None

    def remove(self, device_id: str, dataset: str, snapshot: str) -> bool:
        """Retention (the broker's PRUNE): the manifest unlinked, durably (its directory fsynced).
        False if it was not there: pruning again is harmless. Its chunks stay until garbage collection."""
        path = self._path(device_id, dataset, snapshot)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(path.parent, self.io)
        return True

    def exists(self, device_id: str, dataset: str, snapshot: str) -> bool:
        return self._path(device_id, dataset, snapshot).exists()

    def all_for_device(self, device_id: str):
        base = self.root / device_id
        if not base.is_dir():
            return
        for path in sorted(base.glob("*/*.manifest")):
            try:
                yield Manifest.from_bytes(path.read_bytes())
            except Exception:
                continue  # scrub reports damaged manifests; ownership just skips them
