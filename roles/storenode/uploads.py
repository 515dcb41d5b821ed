"""Storage-side upload state: one UploadSession per transfer, and the
per-device bookkeeping that keeps one device's concurrent uploads from
sending the same chunk twice.

Plain objects: no sockets, no disk, no clock, no threads (the loop thread
only). Their states and the moves between them are the table in
`transitions.py`.

Upload: the agent sends the manifest in order as QUERY slices; each slice is
answered with the indexes this device has not stored, each name at most once
per transfer (the first index it appears at). COMMIT is allowed when every
slice has arrived and every name told missing has been stored. A name
another upload of the same device was asked for is not asked again: this
upload depends on it, and its COMMIT waits (state waiting_on_peer) until
that chunk is stored, or fails if the other upload goes away without it.
"""

from __future__ import annotations

from collections import deque
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
    state: str = "open"  # see transitions.UPLOAD_TRANSITIONS
    last_activity: float = 0.0
    # QUERY slices whose chunk-file check runs on the store pool, answered in
    # arrival order: [seq, start, names, absent-or-None]; a COMMIT that
    # arrives behind them waits in `deferred_commit`.
    pending_queries: deque = field(default_factory=deque)
    deferred_commit: object = None
    # The whole-image blake3 is computed while the upload runs: `cursor` is
    # the next index to feed; chunks received ahead of it wait in `arrived`.
    cursor: int = 0
    arrived: dict = field(default_factory=dict)
    arrived_bytes: int = 0

    def __post_init__(self):
        self.geometry = ImageGeometry(self.image_size, self.chunk_size)
        self.geometry.validate(self.chunk_count)

    def record_slice(self, start: int, names: list, owns, in_flight=lambda name: False) -> list:
        """Accept manifest entries [start, start+len); return missing indexes.

        `owns(name)`: the device has stored it. `in_flight(name)`: another
        upload of the same device has been asked for it; this one then
        depends on it instead of sending it twice.
        """
        if self.state != "open":
            raise RequestError(f"transfer is {self.state}", "bad_state")
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


class DeviceInFlight:
    """Per device: the chunk names its uploads have been asked for and not yet
    stored (with how many uploads were asked), and the commits waiting on
    them. Indexed by device, so a STORED or a closed upload rechecks only
    that device's waiting commits."""

    def __init__(self):
        self._names: dict[str, dict] = {}  # device -> {name: uploads asked to send it}
        self._waiting: dict[str, dict] = {}  # device -> {transfer id: None}, in arrival order

    def contains(self, device: str, name: bytes) -> bool:
        names = self._names.get(device)
        return names is not None and name in names

    def ask(self, device: str, name: bytes) -> None:
        names = self._names.setdefault(device, {})
        names[name] = names.get(name, 0) + 1

    def release(self, device: str, names) -> None:
        in_flight = self._names.get(device)
        if in_flight is None:
            return
        for name in names:
            count = in_flight.get(name, 0) - 1
            if count > 0:
                in_flight[name] = count
            else:
                in_flight.pop(name, None)
        if not in_flight:
            del self._names[device]

    def wait(self, device: str, transfer_id: str) -> None:
        self._waiting.setdefault(device, {})[transfer_id] = None

    def unwait(self, device: str, transfer_id: str) -> None:
        waiting = self._waiting.get(device)
        if waiting is not None:
            waiting.pop(transfer_id, None)
            if not waiting:
                del self._waiting[device]

    def waiting(self, device: str) -> list:
        """The transfer ids of this device's commits waiting on its in-flight chunks."""
        return list(self._waiting.get(device, ()))

    def statistics(self) -> tuple[int, int]:
        """(names in flight, commits waiting), over all devices (status only)."""
        return sum(map(len, self._names.values())), sum(map(len, self._waiting.values()))
