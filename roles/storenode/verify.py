"""Feeding the whole-image hasher: zeros for all-zero chunks, chunk bytes
kept from their arrival, or chunks read back (verified against their length)
from the store. The storage node calls `hash_pieces` in image order while an
upload runs (see UploadSession.hashable_pieces), so that committing a manifest
needs no second pass over the image.
"""

from __future__ import annotations

from bus.errors import RequestError
from roles.chunkdata import decode_payload, feed_zeros
from roles.storenode.chunkstore import ChunkStore


def _load(store: ChunkStore, index: int, name: bytes, expected: int) -> bytes:
    try:
        codec, raw_len, payload = store.read_stored(name)
        raw = decode_payload(codec, payload, raw_len)
    except RequestError as exc:
        raise RequestError(f"chunk {index}: {exc.reason}", "commit_failed") from None
    if len(raw) != expected:
        raise RequestError(f"chunk {index} is {len(raw)} bytes, expected {expected}", "commit_failed")
    return raw


def hash_pieces(hasher, store: ChunkStore, pieces: list) -> None:
    """Feed image pieces in order: (index, name, raw or None, length). A piece
    without raw bytes is all zeros (name None) or read back from the store."""
    for index, name, raw, length in pieces:
        if name is None:
            feed_zeros(hasher, length)
        else:
            hasher.update(raw if raw is not None else _load(store, index, name, length))
