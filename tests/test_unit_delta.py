"""Sub-chunk deltas (roles/delta.py): what a changed chunk costs against its base, and the storage
node's checks: a delta rebuilds exactly its chunk or is refused bad_delta, a bomb before it is held."""

from __future__ import annotations

import random
import tracemalloc

import blake3
import pytest
import zstandard

from bus.errors import RequestError
from roles.delta import apply_delta, make_delta

MiB = 1 << 20


def rewritten(base: bytes, pages: int, seed: int) -> bytes:
    """base with `pages` scattered 4 KiB pages rewritten with random bytes."""
    rng = random.Random(seed)
    out = bytearray(base)
    for _ in range(pages):
        at = rng.randrange(0, len(base) // 4096) * 4096
        out[at:at + 4096] = rng.randbytes(4096)
    return bytes(out)


@pytest.mark.parametrize("level", [1, 3, 9])
def test_a_chunk_with_a_few_pages_changed_costs_about_those_pages(level):
    base = random.Random(1).randbytes(MiB)
    raw = rewritten(base, 5, seed=2)
    delta = make_delta(base, raw, level)
    # five random 4 KiB pages cannot be compressed: what they cost, plus a little for the matches
    assert len(delta) < 5 * 4096 * 1.1
    whole = zstandard.ZstdCompressor(level=level).compress(raw)
    assert len(delta) < len(whole) / 40
    assert apply_delta(base, delta, len(raw), blake3.blake3(raw).digest()) == raw


def test_a_delta_of_a_16_mib_chunk_finds_its_base():
    base = random.Random(3).randbytes(16 * MiB)
    raw = rewritten(base, 8, seed=4)
    delta = make_delta(base, raw, 1)
    assert len(delta) < 8 * 4096 * 1.2
    assert apply_delta(base, delta, len(raw), blake3.blake3(raw).digest()) == raw


def test_a_delta_against_another_base_is_refused():
    base = random.Random(5).randbytes(MiB)
    raw = rewritten(base, 3, seed=6)
    delta = make_delta(base, raw)
    with pytest.raises(RequestError) as info:
        apply_delta(random.Random(7).randbytes(MiB), delta, len(raw), blake3.blake3(raw).digest())
    assert info.value.code == "bad_delta"


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_delta_is_refused(damage):
    base = random.Random(8).randbytes(MiB)
    raw = rewritten(base, 3, seed=9)
    delta = bytearray(make_delta(base, raw))
    if damage == "flip":
        delta[len(delta) // 2] ^= 0xFF
    elif damage == "truncate":
        del delta[len(delta) // 2:]
    else:
        delta = bytearray(b"\x28\xb5\x2f\xfd" + b"\x00" * 64)
    with pytest.raises(RequestError) as info:
        apply_delta(base, bytes(delta), len(raw), blake3.blake3(raw).digest())
    assert info.value.code == "bad_delta"


@pytest.mark.parametrize("content_size", [True, False])
def test_a_delta_that_expands_past_its_announced_length_is_refused_before_it_is_held(content_size):
    base = bytes(MiB)
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=content_size).compress(bytes(256 * MiB))
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as info:
            apply_delta(base, bomb, MiB, blake3.blake3(bytes(MiB)).digest())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "bad_delta"
    assert peak < 4 * MiB + MiB, peak  # the base's dictionary copy and at most the announced length
