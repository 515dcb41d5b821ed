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
