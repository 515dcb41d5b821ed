"""Whole-image verification: every chunk present and whole, and the image's blake3.

Used before a manifest is committed. Chunks are read and decompressed a few
at a time on helper threads (zstd and file reads release the GIL) while this
thread feeds them, in order, to the one whole-image hasher. Per-chunk names
are not re-hashed here: if the image's blake3 matches, every chunk is right;
if it does not, the chunks are checked one by one to say which is damaged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import blake3

from bus.errors import RequestError
from roles.storenode.chunkstore import ChunkStore, decode_payload
from roles.storenode.manifests import Manifest

_ZEROS = bytes(1024 * 1024)
READ_THREADS = 3
READ_AHEAD = 8
_readers = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="verify")


def _feed_zeros(hasher, n: int) -> None:
    while n > 0:
        step = min(n, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:step])
        n -= step


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
            _feed_zeros(hasher, length)
        else:
            hasher.update(raw if raw is not None else _load(store, index, name, length))


def verify_image(store: ChunkStore, manifest: Manifest) -> bytes:
    """The image's blake3 rebuilt from its chunks; RequestError(commit_failed)
    unless every chunk is present and whole and (when the manifest names
    one) the image's blake3 matches."""
    hasher = blake3.blake3()
    pending = []
    jobs = ((i, name, manifest.chunk_len(i)) for i, name in enumerate(manifest.chunks))

    def refill():
        while len(pending) < READ_AHEAD:
            job = next(jobs, None)
            if job is None:
                return
            index, name, expected = job
            pending.append((expected, None if name is None else _readers.submit(_load, store, index, name, expected)))

    refill()
    while pending:
        expected, future = pending.pop(0)
        refill()
        if future is None:
            _feed_zeros(hasher, expected)
        else:
            hasher.update(future.result())
    digest = hasher.digest()
    if manifest.image_blake3 is not None and digest != manifest.image_blake3:
        for index, name in enumerate(manifest.chunks):
            if name is not None and blake3.blake3(_load(store, index, name, manifest.chunk_len(index))).digest() != name:
                raise RequestError(f"chunk {index} is damaged on disk", "commit_failed")
        raise RequestError("the chunks do not rebuild an image with the offered blake3", "commit_failed")
    return digest
