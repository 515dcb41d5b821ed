"""Schemas: golden wire vectors both ways, every refusal path, and a seeded fuzz."""

import msgpack
import pytest

from bus.errors import CODES, LocalProtocolError, RemoteProtocolError
from schemas import MESSAGES, decode, encode, make
from schemas.doc import protocol_table
from tests.fuzzcases import cases, valid_samples

HASH = bytes(range(32))

# (message, exact header bytes). Changing a vector is a wire change: bump `v`
# if it is not backwards compatible.
GOLDEN = [
    (make("HELLO", device_id="office-1"),
     b"\x83\xa1v\x01\xa1t\xa5HELLO\xa9device_id\xa8office-1"),
    (make("CREDIT", transfer_id="t-1", bytes=1048576),
     b"\x84\xa1v\x01\xa1t\xa6CREDIT\xabtransfer_id\xa3t-1\xa5bytes\xce\x00\x10\x00\x00"),
    (make("QUERY", transfer_id="t-1", start=0, hashes=[HASH, None]),
     b"\x85\xa1v\x01\xa1t\xa5QUERY\xabtransfer_id\xa3t-1\xa5start\x00\xa6hashes\x92\xc4\x20" + HASH + b"\xc0"),
    (make("ERROR", code="bad_chunk", reason="no"),
     b"\x84\xa1v\x01\xa1t\xa5ERROR\xa4code\xa9bad_chunk\xa6reason\xa2no"),
]


@pytest.mark.parametrize("message,header", GOLDEN, ids=[m.t for m, _ in GOLDEN])
def test_golden_vectors_both_ways(message, header):
    assert encode(message)[0] == header
    assert decode([header]) == message


def test_payload_frames_are_passed_through_untouched():
    payload = memoryview(b"\x00\x01" * 100)
    frames = encode(make("CHUNK", payload=[payload], transfer_id="t", hash=HASH, raw_len=200, codec="raw"))
    assert frames[1] is payload
    assert bytes(decode(frames).payload[0]) == bytes(payload)


def header(**fields):
    return msgpack.packb({"v": 1, **fields}, use_bin_type=True)


@pytest.mark.parametrize("frames,code", [
    ([], "bad_frames"),
    ([b""], "bad_frames"),
    ([b"\xc1garbage"], "bad_header"),
    ([msgpack.packb([1, 2])], "bad_header"),
    ([msgpack.packb({"t": "HELLO", "device_id": "a"})], "bad_version"),
    ([msgpack.packb({"v": 2, "t": "HELLO", "device_id": "a"})], "bad_version"),
    ([header(t="NOPE")], "unknown_type"),
    ([header(t="HELLO")], "bad_field"),
    ([header(t="HELLO", device_id="../../etc")], "bad_id"),
    ([header(t="HELLO", device_id="a/b")], "bad_id"),
    ([header(t="HELLO", device_id="")], "bad_id"),
    ([header(t="HELLO", device_id="x" * 129)], "bad_id"),
    ([header(t="HELLO", device_id="a", extra=1)], "bad_field"),
    ([header(t="HELLO", device_id="a", software="x" * 5000)], "too_large"),
    ([header(t="CREDIT", transfer_id="t", bytes=-1)], "bad_field"),
    ([header(t="CREDIT", transfer_id="t", bytes=True)], "bad_field"),
    ([header(t="CHUNK", transfer_id="t", hash=HASH, raw_len=1, codec="raw")], "bad_frames"),
    ([header(t="CHUNK", transfer_id="t", hash=b"short", raw_len=1, codec="raw"), b"x"], "bad_field"),
    ([header(t="CHUNK", transfer_id="t", hash=HASH, raw_len=1, codec="lz4"), b"x"], "bad_field"),
    ([header(t="QUERY", transfer_id="t", start=0, hashes=[HASH] * 4097)], "too_large"),
    ([header(t="HELLO", device_id="a")] + [b"x"] * 9, "bad_frames"),
])
def test_refusals_carry_stable_codes(frames, code):
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames)
    assert info.value.code == code


def test_an_invalid_message_cannot_be_built():
    with pytest.raises(LocalProtocolError):
        make("HELLO", device_id="../x")
    with pytest.raises(LocalProtocolError):
        make("NOPE")


FUZZ_CASES = 100_000  # per run of the suite; the live broker gets as many (test_e2e_fuzz.py)


def test_seeded_fuzz_yields_a_message_or_a_protocol_error():
    seed = 20261125
    samples = valid_samples() + [[bytes(f) for f in encode(m)] for m, _ in GOLDEN]
    outcomes = {"ok": 0, "refused": 0}
    for number, frames in enumerate(cases(seed, FUZZ_CASES, samples)):
        try:
            msg = decode(frames)
        except RemoteProtocolError as exc:
            assert exc.code in CODES, f"seed {seed} case {number}: unknown code {exc.code}"
            outcomes["refused"] += 1
        else:
            assert msg.t in MESSAGES, f"seed {seed} case {number}"
            outcomes["ok"] += 1
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0, f"seed {seed}: {outcomes}"


def test_readme_protocol_table_is_generated_from_schemas():
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert protocol_table() in readme, "README's protocol table is stale: paste `python -m schemas.doc`"
