"""Rebuild an image from the cloud, verified chunk by chunk and as a whole.

`ImageWriter` is the plain logic: it takes IMAGE and BLOCK messages in
order, checks each chunk's blake3 against its name, writes it at its offset
in a temporary file, feeds the whole-image hasher, and returns credit to
grant back. `finish()` checks the whole-image blake3, fsyncs and renames to
the final name; any failure removes the temporary file, so a wrong byte
never leaves a FILE behind. The `speedsync restore` loop around it is
roles/restore.py.

The IMAGE it is given has been checked by the broker against the catalog's
size, chunk count and blake3 (roles/controller/restores.py), so the
whole-image check below is against what the catalog recorded at commit.

The temporary file is created with O_CREAT|O_EXCL|O_NOFOLLOW: a file or a
symlink someone planted at its name is never written through. A temporary
left by a killed restore is removed when the next one starts (`__enter__`);
unlinking a planted symlink removes the link, never its target.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from bus.errors import RequestError
from roles.chunkdata import decode_and_verify, feed_zeros
from roles.durable import fsync_dir
from roles.geometry import ImageGeometry


class ImageWriter:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.restoring")
        self.fd: int | None = None
        self.hasher = blake3.blake3()
        self.expected_blake3: bytes | None = None
        self.chunk_count = 0
        self.chunk_size = 0
        self.image_size = 0
        self.next_index = 0
        self.created = False  # the temporary file is ours (only then is it ours to remove)

    def on_image(self, image_size: int, chunk_size: int, chunk_count: int, image_blake3: bytes) -> None:
        if self.fd is not None:
            raise RequestError("a second IMAGE for one restore", "bad_state")
        if ImageGeometry(image_size, chunk_size).chunk_count != chunk_count:
            raise RequestError(f"{chunk_count} chunks of {chunk_size} bytes cannot make {image_size} bytes",
                               "bad_field")
        self.image_size, self.chunk_size, self.chunk_count = image_size, chunk_size, chunk_count
        self.expected_blake3 = image_blake3
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.created = True
        os.ftruncate(self.fd, image_size)

    def on_block(self, index: int, name: bytes | None, raw_len: int, codec: str, payload) -> int:
        """Write one chunk; returns the credit (payload bytes) to grant back."""
        if self.fd is None:
            raise RequestError("BLOCK before IMAGE", "bad_state")
        if index != self.next_index:
            raise RequestError(f"chunk {index} arrived, expected {self.next_index}", "bad_state")
        expected_len = ImageGeometry(self.image_size, self.chunk_size).chunk_len(index)
        if raw_len != expected_len:
            raise RequestError(f"chunk {index} is {raw_len} bytes, expected {expected_len}", "bad_chunk")
        if name is None:
            feed_zeros(self.hasher, raw_len)  # the file is already zero there (ftruncate)
        else:
            if payload is None:
                raise RequestError(f"chunk {index} has no data", "bad_chunk")
            try:
                raw = decode_and_verify(codec, payload, raw_len, name)
            except RequestError as exc:
                raise RequestError(f"chunk {index}: {exc.reason}: the cloud copy is damaged", "bad_chunk") from None
            os.pwrite(self.fd, raw, index * self.chunk_size)
            self.hasher.update(raw)
        self.next_index += 1
        return len(payload) if payload is not None else 0

    @property
    def complete(self) -> bool:
        return self.fd is not None and self.next_index >= self.chunk_count

    def finish(self) -> None:
        if self.hasher.digest() != self.expected_blake3:
            raise RequestError("the restored image does not match its blake3", "bad_chunk")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, self.out)
        self.created = False
        fsync_dir(self.out.parent)

    def remove_stale(self) -> bool:
        """A temporary left by a restore that was killed: removed (a symlink: the link only)."""
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            return False
        return True

    def __enter__(self) -> "ImageWriter":
        self.remove_stale()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.fd is not None:
            self.discard()

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.created:
            self.tmp.unlink(missing_ok=True)
            self.created = False
