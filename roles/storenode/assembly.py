"""Reassembly of chunks that a paced agent sent in pieces.

Pieces of one chunk arrive in order on one connection (the broker forwards
them as they come). An honest broker bounds them by credit (no device has
more payload in flight than its share of this node's window), but the node
does not rely on it: the bytes it holds in pieces are counted per device
and capped (`device_bytes_max`, the node's window, or one whole chunk if
that is larger). A piece past the cap is refused with over_budget and the
chunk it belongs to is dropped (ERROR ref CHUNK: the broker returns its
credit), and no other device's pieces are touched. Partials are indexed by transfer, so
closing an upload forgets its pieces in O(its pieces).
"""

from __future__ import annotations

from collections import Counter

from bus.errors import RequestError
from roles.counting import decrement
from schemas.messages import MAX_WIRE_CHUNK


class PieceAssembler:
    def __init__(self, device_bytes_max: int):
        self.device_bytes_max = max(device_bytes_max, MAX_WIRE_CHUNK)
        self._partial: dict[str, dict[bytes, bytearray]] = {}  # transfer -> chunk name -> bytes so far
        self._device_of: dict[str, str] = {}  # transfer -> device, for transfers with partials
        self._bytes: Counter = Counter()  # device -> bytes held in partials

    def add(self, transfer_id: str, device: str, name: bytes, offset: int | None, total: int | None,
            piece) -> bytes | None:
        """The whole payload once its last piece is in, else None."""
        if offset is None and total is None:
            return piece  # not split
        offset = offset or 0
        total = total if total is not None else len(piece)
        chunks = self._partial.get(transfer_id)
        buffer = None if chunks is None else chunks.get(name)
        expected = 0 if buffer is None else len(buffer)
        if offset != expected:
            self._discard(transfer_id, name)
            raise RequestError(f"piece at {offset}, expected {expected}", "bad_field")
        if offset + len(piece) > total:
            self._discard(transfer_id, name)
            raise RequestError("piece runs past the chunk's total", "bad_field")
        if offset + len(piece) == total and buffer is None:
            return bytes(piece)  # one piece that is the whole chunk: nothing to hold
        if self._bytes[device] + len(piece) > self.device_bytes_max:
            self._discard(transfer_id, name)
            raise RequestError(f"device {device} holds {self._bytes[device]} bytes of chunks in pieces on this "
                               f"node (at most {self.device_bytes_max})", "over_budget")
        if buffer is None:
            buffer = self._partial.setdefault(transfer_id, {})[name] = bytearray()
            self._device_of[transfer_id] = device
        buffer += piece
        self._bytes[device] += len(piece)
        if len(buffer) < total:
            return None
        self._discard(transfer_id, name)
        return bytes(buffer)

    def _discard(self, transfer_id: str, name: bytes) -> None:
        chunks = self._partial.get(transfer_id)
        if chunks is None or name not in chunks:
            return
        decrement(self._bytes, self._device_of[transfer_id], len(chunks.pop(name)))
        if not chunks:
            del self._partial[transfer_id]
            del self._device_of[transfer_id]

    def forget(self, transfer_id: str) -> None:
        for name in list(self._partial.get(transfer_id, ())):
            self._discard(transfer_id, name)

    def device_bytes(self, device: str) -> int:
        return self._bytes.get(device, 0)

    @property
    def pending_bytes(self) -> int:
        return sum(self._bytes.values())
