"""The whole-image hash, computed while an upload runs: an actor on the one
"image" pool thread.

Theory of operation: the loop feeds `feed(transfer_id, pieces)` in image
order (UploadSession.hashable_pieces advances the cursor on the loop) and,
at commit, `finish(transfer_id, manifest)`. The image pool has one thread,
so every call runs in submission order. The actor keeps its own hasher and
first error per transfer id, touched only on that thread: no session object
crosses threads, and the loop never sees a hasher. `drop(transfer_id)`
forgets an upload that closed without committing (it runs after any feed
already queued for it).
"""

from __future__ import annotations

import dataclasses

import blake3

from bus.errors import RequestError
from roles.storenode.verify import hash_pieces


@dataclasses.dataclass(slots=True)
class _Hashing:
    hasher: object
    error: RequestError | None = None


class ImageHashes:
    """Per-transfer hasher state. Every method runs on the image thread."""

    def __init__(self, chunks, manifests):
        self._chunks = chunks
        self._manifests = manifests
        self._by_transfer: dict[str, _Hashing] = {}

    def feed(self, transfer_id: str, pieces: list) -> None:
        hashing = self._by_transfer.get(transfer_id)
        if hashing is None:
            hashing = self._by_transfer[transfer_id] = _Hashing(blake3.blake3())
        if hashing.error is None:
            try:
                hash_pieces(hashing.hasher, self._chunks, pieces)
            except RequestError as exc:
                hashing.error = exc  # raised at commit
            except OSError as exc:  # a chunk unreadable: the upload parks at commit, the node serves on
                hashing.error = RequestError(f"chunk read failed: {exc.strerror or exc}", "storage_error")

    def digest(self, transfer_id: str) -> bytes:
        """The image's blake3 so far, and the transfer forgotten; raises its first error."""
        hashing = self._by_transfer.pop(transfer_id, None)
        if hashing is None:
            return blake3.blake3().digest()  # an empty image: nothing was fed
        if hashing.error is not None:
            raise hashing.error
        return hashing.hasher.digest()

    def finish(self, transfer_id: str, manifest):
        """At commit, after every piece: check the blake3, save the manifest durably."""
        digest = self.digest(transfer_id)
        if manifest.image_blake3 is not None and digest != manifest.image_blake3:
            raise RequestError("the chunks do not rebuild an image with the offered blake3", "commit_failed")
        manifest = dataclasses.replace(manifest, image_blake3=digest)
        self._manifests.save(manifest)
        return manifest

    def drop(self, transfer_id: str) -> None:
        self._by_transfer.pop(transfer_id, None)

    def __len__(self) -> int:
        return len(self._by_transfer)
