"""Reassembly of chunks that a paced agent sent in pieces.

Pieces of one chunk arrive in order on one connection (the broker forwards
them as they come). Memory is bounded by credit: no sender has more payload
in flight than the broker granted it.
"""

from __future__ import annotations

from bus.errors import RequestError


class PieceAssembler:
    def __init__(self):
        self._partial: dict[tuple, bytearray] = {}

    def add(self, transfer_id: str, name: bytes, offset: int | None, total: int | None, piece) -> bytes | None:
        """The whole payload once its last piece is in, else None."""
        if offset is None and total is None:
            return piece  # not split
        offset = offset or 0
        total = total if total is not None else len(piece)
        key = (transfer_id, name)
        buffer = self._partial.get(key)
        expected = 0 if buffer is None else len(buffer)
        if offset != expected:
            self._partial.pop(key, None)
            raise RequestError(f"piece at {offset}, expected {expected}", "bad_field")
        if offset + len(piece) > total:
            self._partial.pop(key, None)
            raise RequestError("piece runs past the chunk's total", "bad_field")
        if buffer is None:
            buffer = self._partial[key] = bytearray()
        buffer += piece
        if len(buffer) < total:
            return None
        del self._partial[key]
        return bytes(buffer)

    def forget(self, transfer_id: str) -> None:
        for key in [k for k in self._partial if k[0] == transfer_id]:
            del self._partial[key]

    @property
    def pending_bytes(self) -> int:
        return sum(len(b) for b in self._partial.values())
