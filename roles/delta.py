"""Sub-chunk deltas (DESIGN.md "Sub-chunk deltas"): a changed chunk compressed
with its base, the chunk at the same index of the dataset's previous snapshot,
as a zstd raw-content dictionary (the idea of `zstd --patch-from`), so that
only what differs costs bytes on the link.

Two things make the dictionary work. zstd only finds matches in it when the
window covers the dictionary and the chunk together and the match finder's
tables are large enough: at levels 1 and 2 (and negative ones) the defaults
find nothing, so `window_log` and `hash_log` are set explicitly. And a
raw-content frame carries dictionary id 0, so the message must name its base.

`apply_delta` is the storage node's side: it rebuilds the chunk under a hard
output limit (the chunk's announced length: a decompression bomb is refused
before it is allocated) and checks its blake3 against the chunk's name; only a
chunk that passes is stored, whole.
"""

from __future__ import annotations

import blake3
import zstandard

from bus.errors import RequestError
from roles.chunkdata import zstd_decompress

WINDOW_LOG_MIN = 20
HASH_LOG_MIN = 17
WINDOW_LOG_MAX = 26  # base + chunk of the largest chunk size (16 MiB each) fit in 64 MiB


def _window_log(base_len: int, raw_len: int) -> int:
    return min(WINDOW_LOG_MAX, max(WINDOW_LOG_MIN, (base_len + raw_len - 1).bit_length()))


def _dictionary(base) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def make_delta(base, raw, level: int = 3) -> bytes:
    """`raw` compressed against `base`; the frame records raw's length."""
    level = max(1, level)
    # the match finder's table must index the base: about one entry per 8 bytes of it (a 16 MiB base
    # with the 17 that suits 1 MiB finds almost nothing)
    hash_log = max(HASH_LOG_MIN, zstandard.ZstdCompressionParameters.from_level(level).hash_log,
                   len(base).bit_length() - 3)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(raw), window_log=_window_log(len(base), len(raw)), hash_log=hash_log)
    return zstandard.ZstdCompressor(dict_data=_dictionary(base), compression_params=params).compress(raw)


def apply_delta(base, delta, raw_len: int, name: bytes) -> bytes:
    """The chunk `delta` rebuilds from `base`: exactly raw_len bytes whose blake3 is `name`, else
    RequestError bad_delta."""
    decompressor = zstandard.ZstdDecompressor(dict_data=_dictionary(base),
                                              max_window_size=1 << WINDOW_LOG_MAX)
    raw = zstd_decompress(delta, raw_len, decompressor, code="bad_delta")
    if len(raw) != raw_len:
        raise RequestError(f"delta rebuilds {len(raw)} bytes, announced {raw_len}", "bad_delta")
    if blake3.blake3(raw).digest() != name:
        raise RequestError("delta rebuilds a chunk whose blake3 is not its name", "bad_delta")
    return raw
