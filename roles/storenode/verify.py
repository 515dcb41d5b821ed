"""Whole-image verification: every chunk present, verified, and the image's blake3.

Used before a manifest is committed (and by the scrub). Runs on a store
thread: decompression and blake3 release the GIL.
"""

from __future__ import annotations

import blake3

from bus.errors import RequestError
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.manifests import Manifest

_ZEROS = bytes(1024 * 1024)


def _feed_zeros(hasher, n: int) -> None:
    while n > 0:
        step = min(n, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:step])
        n -= step


def verify_image(store: ChunkStore, manifest: Manifest) -> bytes:
    """The image's blake3 rebuilt from its chunks; RequestError(commit_failed)
    unless every chunk is present and whole and (when the manifest names
    one) the image's blake3 matches."""
    hasher = blake3.blake3()
    for index, name in enumerate(manifest.chunks):
        expected = manifest.chunk_len(index)
        if name is None:
            _feed_zeros(hasher, expected)
            continue
        try:
            raw = store.read_raw(name)
        except RequestError as exc:
            raise RequestError(f"chunk {index}: {exc.reason}", "commit_failed") from None
        if len(raw) != expected:
            raise RequestError(f"chunk {index} is {len(raw)} bytes, expected {expected}", "commit_failed")
        hasher.update(raw)
    digest = hasher.digest()
    if manifest.image_blake3 is not None and digest != manifest.image_blake3:
        raise RequestError("the chunks do not rebuild an image with the offered blake3", "commit_failed")
    return digest
