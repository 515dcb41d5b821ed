"""The one entry point for untrusted frames, and the one way to build messages.

`decode(frames)` checks, in order: frame count, header size (the receiver's
largest), `v` and `t` read without building the header, the header size
against `t`'s own limit, msgpack with `t`'s limits, the type's fields and
payload count. It returns a frozen
`Message` or raises RemoteProtocolError; nothing else unpacks a header.
`make(t, **fields)` validates too (raising LocalProtocolError), so an invalid
message cannot be constructed.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Sequence

from bus.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from bus.frames import pack_header, peek_scalars, require_size, unpack_header
from schemas.limits import PEEK_MAX_ENTRIES, UNPACK_LIMITS, max_header_for
from schemas.messages import MESSAGES, PROTOCOL_VERSION

MAX_FRAMES = 8


class Message:
    """A validated message: type `t`, read-only `fields`, raw `payload` frames."""

    __slots__ = ("t", "fields", "payload")

    def __init__(self, t: str, fields: Mapping[str, Any], payload: tuple):
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "fields", MappingProxyType(dict(fields)))
        object.__setattr__(self, "payload", payload)

    def __setattr__(self, name, value):
        raise AttributeError("Message is immutable")

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"Message({self.t}, {dict(self.fields)!r}, payload={len(self.payload)})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, Message) and self.t == other.t and dict(self.fields) == dict(other.fields)
                and [bytes(p) for p in self.payload] == [bytes(p) for p in other.payload])


def _validate(t: str, fields: Mapping[str, Any], payload_count: int, error: type[ProtocolError]) -> dict:
    spec = MESSAGES.get(t)
    if spec is None:
        raise error(f"unknown message type {t!r}", "unknown_type")
    out = {}
    for name, ftype in spec.fields.items():
        if name not in fields or fields[name] is None and not getattr(ftype, "nullable", False):
            if ftype.required:
                raise error(f"{t}: field {name!r} is missing", "bad_field")
            continue
        try:
            out[name] = ftype.check(fields[name])
        except ValueError as exc:
            code = "bad_id" if ftype.describe() == "id" else ("too_large" if "more than" in str(exc) else "bad_field")
            raise error(f"{t}: field {name!r}: {exc}", code) from None
    unknown = set(fields) - set(spec.fields) - {"v", "t"}
    if unknown:
        raise error(f"{t}: unknown field(s) {', '.join(sorted(map(str, unknown)))}", "bad_field")
    low, high = spec.payload
    if not low <= payload_count <= high:
        raise error(f"{t}: {payload_count} payload frames, expected {low}..{high}", "bad_frames")
    return out


def decode(frames: Sequence, max_header: int | None = None, receiver: str | None = None) -> Message:
    """Decode untrusted frames (routing frames already removed).

    `receiver` (broker, node, agent, operator) bounds the header by the largest
    that role can legally receive; `max_header` bounds it by hand. The type is
    read first without building anything (`peek_scalars`), then the header is
    unpacked with that type's own limits (schemas/limits.py), so a hostile
    header costs at most what a legal one of its type would."""
    if not frames:
        raise RemoteProtocolError("no frames", "bad_frames")
    if len(frames) > MAX_FRAMES:
        raise RemoteProtocolError(f"{len(frames)} frames, at most {MAX_FRAMES}", "bad_frames")
    header_frame = frames[0]
    raw = header_frame.buffer if hasattr(header_frame, "buffer") else header_frame
    require_size(raw, max_header or max_header_for(receiver))
    peeked = peek_scalars(raw, _PEEKED, PEEK_MAX_ENTRIES)
    _require_version(peeked.get("v"))
    t = peeked.get("t")
    if not isinstance(t, str) or t not in MESSAGES:
        raise RemoteProtocolError(f"unknown message type {str(t)[:32]!r}", "unknown_type")
    limits = UNPACK_LIMITS[t]
    if len(raw) > limits.max_bytes:
        raise RemoteProtocolError(f"{t} header of {len(raw)} bytes exceeds {limits.max_bytes}", "too_large")
    header = unpack_header(raw, limits)
    _require_version(header.get("v"))
    if header.get("t") != t:  # a duplicate key: msgpack keeps the last one
        raise RemoteProtocolError("header names its type twice", "bad_header")
    fields = _validate(t, header, len(frames) - 1, RemoteProtocolError)
    return Message(t, fields, tuple(frames[1:]))


_PEEKED = frozenset(("v", "t"))


def _require_version(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RemoteProtocolError("header has no integer 'v'", "bad_version")
    if v != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"protocol version {v}, this side speaks {PROTOCOL_VERSION}", "bad_version")


def make(t: str, payload: Sequence = (), **fields) -> Message:
    """Build a message we are about to send; invalid ones raise LocalProtocolError."""
    checked = _validate(t, fields, len(payload), LocalProtocolError)
    return Message(t, checked, tuple(payload))


def encode(message: Message, pack=pack_header) -> list:
    """Frames for the wire: header, then payload frames untouched (no copies).
    `pack(header) -> bytes`: a reused msgpack Packer's `pack` (bus.sockets.Outbox)."""
    header = {"v": PROTOCOL_VERSION, "t": message.t, **message.fields}
    return [pack(header), *message.payload]


def error_message(exc: ProtocolError | Exception, ref: str | None = None, **extra) -> Message:
    code = getattr(exc, "code", "internal")
    reason = str(exc)[:1024] if code != "internal" else "internal error"
    fields = {"code": code, "reason": reason}
    if ref:
        fields["ref"] = ref[:32]
    fields.update({k: v for k, v in extra.items() if v is not None})
    return make("ERROR", **fields)
