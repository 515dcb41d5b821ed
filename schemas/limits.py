"""Decode limits, computed from the declarations in `messages.py` (never written by hand).

- `UNPACK_LIMITS[t]`: what one header of type `t` may hold (bytes; the longest
  string, bin, array and map anywhere in it), the smallest values any legal
  message of that type needs, with a small floor so that a field of the wrong
  type still reads as `bad_field` rather than `too_large`. A type with a free-form
  document (STATUS_REPLY, LIST_REPLY: only ever sent by the broker) is bounded by
  its size alone.
- `max_header_for(role)`: the largest header frame a role can legally receive
  (the broker and nodes: a QUERY or MISSING; operators and agents: a document).
- `max_frame_for(role, sender)`: the largest frame of any kind, payload included: a
  socket's ZMQ_MAXMSGSIZE (bus/sockets.py), so libzmq disconnects a peer that
  sends more before it is buffered whole.
"""

from __future__ import annotations

from bus.frames import PEEK_MAX_STR, UnpackLimits
from schemas.fields import Bin, Doc, Id, ListOf, Str
from schemas.messages import MAX_WIRE_CHUNK, MESSAGES, MessageType

# Floors: a wrong-typed field (a small list where an id goes) is a bad_field, not a too_large.
FLOOR_ITEMS = 16
FLOOR_BYTES = 64
UTF8_MAX = 4  # Str limits count characters; msgpack's count bytes
# A CurveZMQ MESSAGE command wraps each frame: 8 ("\x07MESSAGE") + 8 (nonce) + 1 (flags) + 16 (MAC) bytes.
CURVE_FRAME_OVERHEAD = 33


def _scalars(ftype) -> list:
    return [ftype.item] if isinstance(ftype, ListOf) else [ftype]


def limits_of(spec: MessageType) -> UnpackLimits:
    if any(isinstance(f, Doc) for f in spec.fields.values()):
        return UnpackLimits.by_size(spec.max_header)
    strings = [len(name.encode()) for name in spec.fields] + [len(spec.name.encode())]
    bins, items = [0], [0]
    for ftype in spec.fields.values():
        if isinstance(ftype, ListOf):
            items.append(ftype.max_items)
        for scalar in _scalars(ftype):
            if isinstance(scalar, Str):
                strings.append(UTF8_MAX * scalar.max_len)
            elif isinstance(scalar, Id):
                strings.append(UTF8_MAX * 128)  # a too-long id is a bad_id, not a too_large
            elif isinstance(scalar, Bin):
                bins.append(scalar.max_len if scalar.size is None else scalar.size)
    return UnpackLimits(max_bytes=spec.max_header,
                        max_str=min(spec.max_header, max(FLOOR_BYTES, *strings)),
                        max_bin=min(spec.max_header, max(FLOOR_BYTES, *bins)),
                        max_array=max(FLOOR_ITEMS, *items),
                        max_map=max(FLOOR_ITEMS, len(spec.fields) + 2))


UNPACK_LIMITS: dict[str, UnpackLimits] = {t: limits_of(spec) for t, spec in MESSAGES.items()}
# A top-level map may hold at most this many entries before we know its type
PEEK_MAX_ENTRIES = max(limits.max_map for limits in UNPACK_LIMITS.values())
assert all(len(t) <= PEEK_MAX_STR for t in MESSAGES)


def receivable(role: str) -> list[MessageType]:
    """The types `role` can receive: addressed to it, or passed on by it (the broker's `via`)."""
    return [m for m in MESSAGES.values() if role in m.receivers or role in m.via]


def _largest_header(role: str | None) -> int:
    specs = receivable(role) if role is not None else MESSAGES.values()
    return max(m.max_header for m in specs)


ROLES = ("agent", "broker", "node", "operator")
_MAX_HEADER = {role: _largest_header(role) for role in (*ROLES, None)}


def max_header_for(role: str | None) -> int:
    return _MAX_HEADER[role]


def max_frame_for(role: str, sender: str | None = None) -> int:
    """The largest legal frame `role` receives (from `sender` only, if given: one socket's
    peers), header or payload, as it travels (with CURVE's wrapping, which plain TCP does not
    add: 33 bytes are not worth a second limit)."""
    specs = [m for m in receivable(role) if sender is None or sender in m.senders]
    largest_payload = MAX_WIRE_CHUNK if any(m.payload[1] > 0 for m in specs) else 0
    return max(largest_payload, max(m.max_header for m in specs)) + CURVE_FRAME_OVERHEAD
