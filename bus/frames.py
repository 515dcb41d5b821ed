"""Frame layout and the header codec, with limits applied before trust.

A message on the wire is: routing frames (added by ROUTER sockets), one
header frame (a msgpack map), then zero or more raw payload frames. This
module decodes the header frame of untrusted bytes in a fixed order, and
never builds more than the limits allow:

1. size: the frame's byte length against the receiver's largest header;
2. `peek_scalars`: the top-level map is walked without building its values
   (msgpack's `skip`), and only the few scalar entries asked for (`v`, `t`)
   are decoded, so the caller learns the message type, and with it the
   type's own limits, before anything of size is allocated;
3. `unpack_header`: msgpack with those limits (`UnpackLimits`: bytes, string,
   bin, array and map lengths); nesting is bounded by msgpack's fixed parse
   stack (1,024 levels: StackError) and by the byte length.

What the fields mean is `schemas/`' business.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from bus.errors import RemoteProtocolError

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# Longest top-level key or scalar a peek decodes (a field name, a message type).
PEEK_MAX_STR = 64
# A peek reads the frame in slices of this size and holds at most PEEK_BUFFER of it:
# the longest single value it can step over before finding `t`.
PEEK_READ = 64 * 1024
PEEK_BUFFER = 512 * 1024


class _Slices:
    """A file-like view of a frame for msgpack.Unpacker: it copies one slice at a time."""

    __slots__ = ("view", "at")

    def __init__(self, raw):
        self.view, self.at = memoryview(raw), 0

    def read(self, n: int) -> bytes:
        piece = bytes(self.view[self.at:self.at + n])
        self.at += len(piece)
        return piece

@dataclass(frozen=True)
class UnpackLimits:
    """What one header may hold: its byte length, and the longest string (bytes),
    bin, array and map anywhere in it."""

    max_bytes: int
    max_str: int
    max_bin: int
    max_array: int
    max_map: int

    @classmethod
    def by_size(cls, max_bytes: int) -> "UnpackLimits":
        """Everything bounded only by the byte length (free-form documents)."""
        return cls(max_bytes, max_bytes, max_bytes, max_bytes, max_bytes)


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _refuse(exc: Exception):
    text = str(exc)
    if isinstance(exc, ValueError) and "exceeds max_" in text:
        # msgpack's own limit check: "4097 exceeds max_array_len(4096)"
        return RemoteProtocolError(f"header holds more than its limits allow: {text[:80]}", "too_large")
    return RemoteProtocolError(f"header is not valid msgpack: {exc.__class__.__name__}", "bad_header")


def require_size(raw, max_bytes: int) -> None:
    if len(raw) == 0:
        raise RemoteProtocolError("empty header frame", "bad_frames")
    if len(raw) > max_bytes:
        raise RemoteProtocolError(f"header of {len(raw)} bytes exceeds {max_bytes}", "too_large")


def peek_scalars(raw, names: frozenset, max_entries: int) -> dict:
    """The entries of the top-level map whose keys are in `names`, decoded only
    if they are short scalars (a longer or nested value reads as absent); every
    other value is skipped unbuilt. Cost: one walk over the bytes, no objects of
    size, and at most PEEK_BUFFER bytes held. Stops as soon as every name is found (our encoder writes them first)."""
    small = len(raw) <= PEEK_READ  # copied whole; a larger frame is read in slices
    unpacker = msgpack.Unpacker(None if small else _Slices(raw), read_size=PEEK_READ, max_buffer_size=PEEK_BUFFER,
                                raw=False, strict_map_key=True, max_str_len=PEEK_MAX_STR, max_bin_len=0,
                                max_array_len=0, max_map_len=0, max_ext_len=0)
    found: dict = {}
    try:
        if small:
            unpacker.feed(raw)
        entries = unpacker.read_map_header()
        if entries > max_entries:
            raise RemoteProtocolError(f"header map of {entries} entries, at most {max_entries}", "too_large")
        for _ in range(entries):
            key = unpacker.unpack()
            if not isinstance(key, str):
                raise RemoteProtocolError("header key is not a string", "bad_header")
            if key in names and key not in found:
                try:
                    found[key] = unpacker.unpack()
                except ValueError:  # longer or nested: not a legal v or t; the full decode says why
                    return found
                if len(found) == len(names):
                    return found
            else:
                unpacker.skip()
    except RemoteProtocolError:
        raise
    except msgpack.BufferFull:
        raise RemoteProtocolError(f"a header value before its type is longer than {PEEK_BUFFER} bytes",
                                  "too_large") from None
    except Exception as exc:  # not a map, truncated, or one of msgpack's undocumented types
        raise RemoteProtocolError(f"header is not a valid msgpack map: {exc.__class__.__name__}",
                                  "bad_header") from None
    return found


def unpack_header(raw: bytes | memoryview, limits: UnpackLimits | int = DEFAULT_MAX_HEADER_BYTES) -> dict:
    """Decode one header frame within `limits` (an int: bounded by size alone);
    raise RemoteProtocolError, never anything else."""
    if isinstance(limits, int):
        limits = UnpackLimits.by_size(limits)
    require_size(raw, limits.max_bytes)
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a few undocumented types on hostile input
        raise _refuse(exc) from None
    if not isinstance(header, dict):
        raise RemoteProtocolError("header is not a map", "bad_header")
    return header
