"""A chunk's bytes: zero blocks, decode-and-verify, and the chunk-file header.

Every side that turns a payload back into raw bytes (storage node on
receipt, restore, the image hasher, scrub) goes through `decode_and_verify`,
so a chunk is accepted only when it decodes to its announced length and its
blake3 equals its name.

Chunk file (storage node): an 8-byte header (magic `SC`, format 1, codec,
raw length), then the payload as it travelled.
"""

from __future__ import annotations

import struct

import blake3
import zstandard

from bus.errors import RequestError

MAGIC = b"SC"
FORMAT = 1
CODEC_IDS = {"raw": 0, "zstd": 1}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
HEADER = struct.Struct(">2sBBI")

_ZEROS = bytes(16 * 1024 * 1024)


def zeros(n: int) -> memoryview:
    """n zero bytes without allocating (n up to the largest chunk size)."""
    if n <= len(_ZEROS):
        return memoryview(_ZEROS)[:n]
    return memoryview(bytes(n))


def feed_zeros(hasher, n: int) -> None:
    while n > 0:
        step = min(n, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:step])
        n -= step


def decode_payload(codec: str, data, raw_len: int) -> bytes:
    """Raw bytes of a chunk payload; RequestError(bad_chunk) if it does not decode to raw_len."""
    if codec == "raw":
        raw = bytes(data)
    elif codec == "zstd":
        raw = zstd_decompress(data, raw_len)
    else:
        raise RequestError(f"unknown codec {codec!r}", "bad_chunk")
    if len(raw) != raw_len:
        raise RequestError(f"chunk is {len(raw)} bytes, announced {raw_len}", "bad_chunk")
    return raw


def zstd_decompress(data, raw_len: int, decompressor: zstandard.ZstdDecompressor | None = None,
                    code: str = "bad_chunk") -> bytes:
    """At most raw_len bytes out. python-zstandard sizes its output by the frame's own content size
    when the frame has one, whatever max_output_size says: a frame claiming more than the chunk's
    announced length (a decompression bomb) is refused before anything is allocated."""
    try:
        claimed = zstandard.get_frame_parameters(data).content_size
        if claimed not in (raw_len, zstandard.CONTENTSIZE_UNKNOWN):
            raise RequestError(f"chunk's frame holds {claimed} bytes, announced {raw_len}", code)
        return (decompressor or zstandard.ZstdDecompressor()).decompress(data, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise RequestError(f"chunk does not decompress: {exc}", code) from None


def decode_and_verify(codec: str, payload, raw_len: int, name: bytes) -> bytes:
    """The raw bytes, checked against the chunk's name; RequestError(bad_chunk) otherwise."""
    raw = decode_payload(codec, payload, raw_len)
    if blake3.blake3(raw).digest() != name:
        raise RequestError("chunk bytes do not match their blake3 name", "bad_chunk")
    return raw


def pack_chunk_header(codec: str, raw_len: int) -> bytes:
    return HEADER.pack(MAGIC, FORMAT, CODEC_IDS[codec], raw_len)


def parse_chunk_file(blob: bytes) -> tuple[str, int, memoryview]:
    """(codec, raw_len, payload) of a chunk file; ValueError naming what is wrong."""
    if len(blob) < HEADER.size:
        raise ValueError("truncated")
    magic, fmt, codec_id, raw_len = HEADER.unpack_from(blob)
    if magic != MAGIC or fmt != FORMAT or codec_id not in CODEC_NAMES:
        raise ValueError("bad header")
    return CODEC_NAMES[codec_id], raw_len, memoryview(blob)[HEADER.size:]
