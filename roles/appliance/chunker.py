"""The CPU and disk work of an upload, run on the agent's thread pool.

blake3, zstd and pread all release the GIL, so these use every core. Each
function is pure given the file: no sockets, no shared state.
"""

from __future__ import annotations

import os
import threading

import blake3
import zstandard

_local = threading.local()


_ZEROS: dict = {}


def zeros(n: int) -> bytes:
    """An all-zero block of exactly n bytes (cached: chunks have few sizes)."""
    block = _ZEROS.get(n)
    if block is None:
        block = _ZEROS[n] = bytes(n)
    return block


def read_and_hash(path: str, start: int, count: int, chunk_size: int, image_size: int,
                  known: dict | None = None, pacer=None) -> list:
    """[(index, name or None for all-zero, raw bytes or None)] for chunks [start, start+count).

    Chunks in `known` (changed-block tracking: unchanged since a committed
    snapshot) are not read; they come back with their known name and no bytes.
    """
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in range(start, start + count):
            if known is not None and index in known:
                out.append((index, known[index], None))
                continue
            offset = index * chunk_size
            length = min(chunk_size, image_size - offset)
            if pacer is not None:
                pacer.acquire(length)  # the appliance's read budget on its snapshot disk
            raw = os.pread(fd, length, offset)
            if len(raw) != length:
                raise OSError(f"{path} is shorter than announced (read {len(raw)} of {length} at {offset})")
            if raw == zeros(length):
                out.append((index, None, None))
            else:
                out.append((index, blake3.blake3(raw).digest(), raw))
    finally:
        os.close(fd)
    return out


def read_chunk(path: str, index: int, chunk_size: int, image_size: int, pacer=None) -> bytes:
    offset = index * chunk_size
    length = min(chunk_size, image_size - offset)
    if pacer is not None:
        pacer.acquire(length)
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise OSError(f"{path} is shorter than announced")
    return raw


def compress(raw: bytes, level: int) -> tuple[str, bytes]:
    """(codec, payload): zstd when it saves anything, else the raw bytes."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None or _local.level != level:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=level)
        _local.level = level
    packed = compressor.compress(raw)
    if len(packed) < len(raw):
        return "zstd", packed
    return "raw", raw


class ImageHasher:
    """The whole-image blake3, fed in order on one dedicated thread."""

    def __init__(self):
        self._hasher = blake3.blake3()

    def update(self, pieces: list) -> None:
        for raw, zero_len in pieces:
            if raw is not None:
                self._hasher.update(raw)
            else:
                self._hasher.update(zeros(zero_len))

    def digest(self) -> bytes:
        return self._hasher.digest()
