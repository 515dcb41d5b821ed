"""Storage-side transfer state: uploads being negotiated and restores streaming.

Plain objects: no sockets, no disk. The storage process feeds them decoded
messages and asks what to do.

Upload: the agent sends the manifest in order as QUERY slices; each slice is
answered with the indexes this device has not stored, each name at most once
per transfer (the first index it appears at). COMMIT is allowed when every
slice has arrived and every name told missing has been stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus.errors import RequestError
from roles.geometry import ImageGeometry
from roles.storenode.manifests import Manifest

MAX_ARRIVED_BYTES = 64 * 1024 * 1024


@dataclass
class UploadSession:
    transfer_id: str
    device_id: str
    dataset: str
    snapshot: str
    image_size: int
    chunk_size: int
    chunk_count: int
    image_blake3: bytes | None = None
    names: list = field(default_factory=list)
    awaiting: set = field(default_factory=set)
    depends: set = field(default_factory=set)  # names another upload of this device is sending
    committing: bool = False
    last_activity: float = 0.0
    # The whole-image blake3 is computed while the upload runs: `cursor` is
    # the next index to feed; chunks received ahead of it wait in `arrived`.
    cursor: int = 0
    arrived: dict = field(default_factory=dict)
    arrived_bytes: int = 0
    hasher: object = None
    hash_error: Exception | None = None  # set on the image thread, read there at commit

    def __post_init__(self):
        self.geometry = ImageGeometry(self.image_size, self.chunk_size)
        self.geometry.validate(self.chunk_count)

    def record_slice(self, start: int, names: list, owns, in_flight=lambda name: False) -> list:
        """Accept manifest entries [start, start+len); return missing indexes.

        `owns(name)`: the device has stored it. `in_flight(name)`: another
        upload of the same device has been asked for it; this one then
        depends on it instead of sending it twice.
        """
        if self.committing:
            raise RequestError("transfer is committing", "bad_state")
        if start != len(self.names):
            raise RequestError(f"manifest slice starts at {start}, expected {len(self.names)}", "bad_state")
        if start + len(names) > self.chunk_count:
            raise RequestError("manifest slice runs past the chunk count", "bad_field")
        missing = []
        for offset, name in enumerate(names):
            if name is None or name in self.awaiting or name in self.depends or owns(name):
                continue
            if in_flight(name):
                self.depends.add(name)
            else:
                self.awaiting.add(name)
                missing.append(start + offset)
        self.names.extend(names)
        return missing

    def expected_len(self, name: bytes, raw_len: int) -> None:
        if name not in self.awaiting:
            raise RequestError("chunk was not asked for in this transfer", "bad_state")
        if raw_len > self.chunk_size:
            raise RequestError(f"chunk of {raw_len} bytes exceeds chunk size {self.chunk_size}", "bad_field")

    def stored(self, name: bytes, raw: bytes | None = None) -> None:
        # Kept for the image hash unless too much waits ahead of the cursor;
        # then it is read back from disk when the cursor gets there.
        if name in self.awaiting and raw is not None and self.arrived_bytes < MAX_ARRIVED_BYTES:
            self.arrived[name] = raw
            self.arrived_bytes += len(raw)
        self.awaiting.discard(name)

    def chunk_len(self, index: int) -> int:
        return self.geometry.chunk_len(index)

    def hashable_pieces(self, owns) -> list:
        """Advance the cursor over what can be hashed now, in order:
        [(index, name, raw or None, length)]; raw None means zeros or disk."""
        pieces = []
        while self.cursor < len(self.names):
            index, name = self.cursor, self.names[self.cursor]
            length = self.chunk_len(index)
            if name is None:
                pieces.append((index, None, None, length))
            elif name in self.arrived:
                raw = self.arrived.pop(name)
                self.arrived_bytes -= len(raw)
                pieces.append((index, name, raw, length))
            elif name not in self.awaiting and owns(name):
                pieces.append((index, name, None, length))
            else:
                break
            self.cursor += 1
        return pieces

    @property
    def fully_hashed(self) -> bool:
        return self.cursor >= self.chunk_count

    def unresolved_depends(self, owns) -> set:
        self.depends = {name for name in self.depends if not owns(name)}
        return self.depends

    def require_complete(self) -> None:
        if len(self.names) != self.chunk_count:
            raise RequestError(f"manifest has {len(self.names)} of {self.chunk_count} entries", "bad_state")
        if self.awaiting:
            raise RequestError(f"{len(self.awaiting)} chunks still to be sent", "bad_state")

    def manifest(self) -> Manifest:
        return Manifest(self.device_id, self.dataset, self.snapshot, self.image_size, self.chunk_size,
                        self.image_blake3, tuple(self.names))


@dataclass
class ReadSession:
    """A restore stream: chunks go out in order, only within the agent's credit."""

    transfer_id: str
    manifest: Manifest
    credit: int
    next_index: int = 0
    last_activity: float = 0.0

    @property
    def finished(self) -> bool:
        return self.next_index >= self.manifest.chunk_count
