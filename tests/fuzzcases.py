"""Seeded decoder fuzz cases, shared by the in-process test and the live-broker test.

Each case is a list of frames (bytes) as a DEALER would send them: a valid
message mutated (bytes overwritten, header truncated, a frame added), or
frames of random bytes. The same seed gives the same cases, so a failure is
replayed by its seed and case number.
"""

from __future__ import annotations

import random

from schemas import encode, make

HASH = bytes(range(32))


def valid_samples(include_hello: bool = True) -> list[list[bytes]]:
    """Valid encodings of messages an agent may send, plus a few it may not.

    Without HELLO a session that only sends these can never register, so a
    live broker answers every case (decode first, then "say HELLO first").
    """
    messages = [
        make("HEARTBEAT"),
        make("BYE"),
        make("OFFER", req=1, dataset="fs", snapshot="s1", image_size=10, chunk_size=4096, chunk_count=1),
        make("OFFER", req=7, device_id="office-1", dataset="fileserver", snapshot="20240101T0000",
             image_size=1 << 30, chunk_size=1 << 20, chunk_count=1024),
        make("QUERY", transfer_id="t-1", start=0, hashes=[HASH, None]),
        make("CHUNK", payload=[b"abc"], transfer_id="t-9", hash=HASH, raw_len=3, codec="raw"),
        make("CREDIT", transfer_id="t-1", bytes=1048576),
        make("COMMIT", transfer_id="t-1", image_blake3=HASH),
        make("ABORT", transfer_id="t-1"),
        make("RESTORE", req=2, dataset="fs", snapshot="s1", window=1 << 25),
        make("LIST", device_id="office-1"),
        make("ERROR", code="bad_chunk", reason="no"),
        make("STATUS"),
        make("READY", node_id="node-a", window=1 << 25, free_bytes=1 << 30, used_bytes=0),
    ]
    if include_hello:
        messages.insert(0, make("HELLO", device_id="office-1"))
    return [[bytes(f) for f in encode(m)] for m in messages]


def mutate(rng: random.Random, samples: list[list[bytes]]) -> list[bytes]:
    """One fuzz case: a sample, mutated in one of four ways chosen by rng."""
    frames = [bytearray(f) for f in rng.choice(samples)]
    mode = rng.random()
    if mode < 0.4:  # overwrite 1-4 bytes of the header
        target = frames[0]
        for _ in range(rng.randint(1, 4)):
            if target:
                target[rng.randrange(len(target))] = rng.randrange(256)
    elif mode < 0.6:  # truncate the header
        frames[0] = frames[0][: rng.randrange(len(frames[0]) + 1)]
    elif mode < 0.8:  # random frames (at least one: a DEALER cannot send none)
        frames = [bytearray(rng.randbytes(rng.randint(0, 64))) for _ in range(rng.randint(1, 10))]
    else:  # an extra payload frame
        frames.append(bytearray(rng.randbytes(rng.randint(0, 8))))
    return [bytes(f) for f in frames]


def cases(seed: int, count: int, samples: list[list[bytes]] | None = None):
    """`count` fuzz cases from `seed` (a generator)."""
    rng = random.Random(seed)
    samples = samples if samples is not None else valid_samples()
    for _ in range(count):
        yield mutate(rng, samples)


# --- hostile messages of every type, from a registered session (issue 11) ----------------------------

import msgpack  # noqa: E402

from schemas.fields import Bin, Bool, Doc, Id, Int, ListOf, Str  # noqa: E402
from schemas.messages import MESSAGES, PROTOCOL_VERSION  # noqa: E402

MUTATIONS = ("valid", "valid", "at_limit", "past_limit", "wrong_type", "missing", "extra", "oversized",
             "nested", "huge_map", "flipped", "payload")


class Targets:
    """What hostile messages aim at: ids of our own, and another device's transfer ids
    (which must be refused and leave that device's transfers alone)."""

    def __init__(self, device_id: str, others: list[str] = (), own: list[str] = ()):
        self.device_id = device_id
        self.others = list(others)  # another device's transfer ids
        self.own = list(own)

    def transfer_id(self, rng: random.Random) -> str:
        pools = [p for p in (self.own, self.others, ["t-" + "%016x" % rng.getrandbits(64)]) if p]
        return rng.choice(rng.choice(pools))


def _value(rng: random.Random, name: str, ftype, targets: Targets):
    if isinstance(ftype, Id):
        if name == "transfer_id":
            return targets.transfer_id(rng)
        if name == "device_id":
            return targets.device_id if rng.random() < 0.8 else "office-1"
        if name == "node_id":
            return targets.device_id
        return rng.choice(("fs", "s1", "ds-%d" % rng.randrange(4)))
    if isinstance(ftype, Bool):
        return rng.random() < 0.5
    if isinstance(ftype, Int):
        if name == "chunk_size":
            return 4096
        if name in ("image_size", "window", "bytes", "raw_len", "wire_len", "total"):
            return max(ftype.min, min(ftype.max, rng.choice((1, 4096, 65536, 1 << 20))))
        return max(ftype.min, min(ftype.max, rng.randrange(0, 8)))
    if isinstance(ftype, Str):
        return rng.choice(ftype.choices) if ftype.choices else "x" * rng.randrange(1, 16)
    if isinstance(ftype, Bin):
        if ftype.nullable and rng.random() < 0.2:
            return None
        return rng.randbytes(ftype.size if ftype.size is not None else 16)
    if isinstance(ftype, ListOf):
        return [_value(rng, name, ftype.item, targets) for _ in range(rng.randrange(0, 4))]
    if isinstance(ftype, Doc):
        return {}
    return None


def _at_limit(ftype, past: bool):
    extra = 1 if past else 0
    if isinstance(ftype, Id):
        return "a" * (128 + extra)
    if isinstance(ftype, Int):
        return ftype.max + extra
    if isinstance(ftype, Str):
        return "s" * (ftype.max_len + extra)
    if isinstance(ftype, Bin):
        return b"\x01" * ((ftype.size if ftype.size is not None else ftype.max_len) + extra)
    if isinstance(ftype, ListOf):
        return [_at_limit(ftype.item, False) for _ in range(ftype.max_items + extra)]
    return [] if past else {}


WRONG = ([1, 2], {"a": 1}, "str", -1, None, b"\x00" * 8, 2**64 - 1, True, 1.5)


def hostile(rng: random.Random, t: str, targets: Targets) -> tuple[str, list[bytes]]:
    """(mutation, frames): a message of type `t` built from its declaration, mutated one way."""
    spec = MESSAGES[t]
    fields = {name: _value(rng, name, ftype, targets) for name, ftype in spec.fields.items()
              if ftype.required or rng.random() < 0.5}
    low, high = spec.payload
    payload = [rng.randbytes(rng.randrange(1, 256))] * low
    if high and not low and rng.random() < 0.5:
        payload = [rng.randbytes(rng.randrange(1, 256))]
    mutation = rng.choice(MUTATIONS)
    names = list(spec.fields)
    if mutation in ("at_limit", "past_limit") and names:
        name = rng.choice(names)
        fields[name] = _at_limit(spec.fields[name], mutation == "past_limit")
    elif mutation == "wrong_type" and names:
        fields[rng.choice(names)] = rng.choice(WRONG)
    elif mutation == "missing" and fields:
        del fields[rng.choice(list(fields))]
    elif mutation == "extra":
        fields["x" + str(rng.randrange(100))] = 1
    elif mutation == "oversized":
        fields["pad"] = b"\0" * (spec.max_header + rng.randrange(1, 4096))
    elif mutation == "nested":  # spliced in as bytes: msgpack's packer refuses to nest this deep
        nested = (rng.choice(names) if names else "deep", rng.choice((50, 1100, 5000)))
        fields.pop(nested[0], None)
    elif mutation == "huge_map":
        fields[rng.choice(names) if names else "map"] = {f"k{i}": i for i in range(rng.choice((17, 1000, 20000)))}
    elif mutation == "payload":
        payload = payload + [b"x"] * rng.randrange(1, 3) if rng.random() < 0.7 else []
    header = msgpack.packb({"v": PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)
    if mutation == "nested":
        name, depth = nested
        header = bytes([header[0] + 1]) + header[1:] + msgpack.packb(name) + b"\x91" * depth + b"\xc0"
    if mutation == "flipped":
        raw = bytearray(header)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        header = bytes(raw)
    return mutation, [header, *payload]
