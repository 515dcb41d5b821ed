"""Frame layout and the header codec, with limits applied before trust.

A message on the wire is: routing frames (added by ROUTER sockets), one
header frame (a msgpack map), then zero or more raw payload frames. This
module decodes the header frame of untrusted bytes in a fixed order: size
first, then msgpack with its own limits, then the map shape. What the fields
mean is `schemas/`' business.
"""

from __future__ import annotations

import msgpack

from bus.errors import RemoteProtocolError

DEFAULT_MAX_HEADER_BYTES = 64 * 1024


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(raw: bytes | memoryview, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict:
    """Decode one header frame; raise RemoteProtocolError, never anything else."""
    if len(raw) == 0:
        raise RemoteProtocolError("empty header frame", "bad_frames")
    if len(raw) > max_bytes:
        raise RemoteProtocolError(f"header of {len(raw)} bytes exceeds {max_bytes}", "too_large")
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, OverflowError, RecursionError) as exc:
        raise RemoteProtocolError(f"header is not valid msgpack: {exc.__class__.__name__}", "bad_header") from None
    except Exception as exc:  # msgpack raises a few undocumented types on hostile input
        raise RemoteProtocolError(f"header is not valid msgpack: {exc.__class__.__name__}", "bad_header") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError("header is not a map", "bad_header")
    return header
