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


# --- limits before allocation (issue 11) -----------------------------------------------------------

NILS = 64 * 1024 * 1024 - 64  # a 64 MiB header of nils: under the largest header any role accepts


def _array32(n: int, item: bytes) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + item * n


def _hostile_headers() -> dict:
    """name -> (header bytes, receiver, expected code)."""
    vt = b"\xa1v\x01\xa1t\xa5HELLO"
    return {
        "64M nils, type first": (b"\x83" + vt + b"\xa3pad" + _array32(NILS, b"\xc0"), None, "too_large"),
        "64M nils, type last": (b"\x83\xa1v\x01\xa3pad" + _array32(NILS, b"\xc0") + b"\xa1t\xa5HELLO", None,
                                "too_large"),
        "64M nils at the broker": (b"\x83" + vt + b"\xa3pad" + _array32(NILS, b"\xc0"), "broker", "too_large"),
        "nested 100k deep before the type": (b"\x83\xa1v\x01\xa3pad" + b"\x91" * 100_000 + b"\xc0" +
                                             b"\xa1t\xa5QUERY", "broker", "bad_header"),
        "nested 3000 deep in a field": (b"\x83" + vt + b"\xa9device_id" + b"\x91" * 3000 + b"\xc0", None,
                                        "bad_header"),
        "a map claiming 2**31 entries": (b"\xdf" + (2**31).to_bytes(4, "big") + vt, None, "too_large"),
        "a field map claiming 2**31 entries": (b"\x84" + vt + b"\xa9device_id\xdf" + (2**31).to_bytes(4, "big"),
                                               None, "too_large"),
        "a 20k-entry map inside a QUERY": (b"\x85\xa1v\x01\xa1t\xa5QUERY\xabtransfer_id\xa1x\xa5start\x00\xa6hashes"
                                           b"\xdf" + (20_000).to_bytes(4, "big") +
                                           b"".join(b"\xa4%04x\xc0" % i for i in range(20_000)), "node",
                                           "too_large"),
        "a list claiming 2**31 items": (b"\x85\xa1v\x01\xa1t\xa5QUERY\xabtransfer_id\xa1x\xa5start\x00\xa6hashes"
                                        b"\xdd" + (2**31).to_bytes(4, "big"), "broker", "too_large"),
        "a 2 MiB string before the type": (b"\x82\xa3pad\xdb" + (2 << 20).to_bytes(4, "big") + b"x" * (2 << 20) +
                                           b"\xa1t\xa5HELLO", None, "too_large"),
    }


@pytest.mark.parametrize("name", list(_hostile_headers()))
def test_hostile_headers_are_refused_before_anything_of_size_is_built(name):
    """Measured before the fix: the 64 M-nil header cost +512 MiB before its refusal. Now every
    one is refused with a stable code, having allocated at most a few hundred KiB."""
    import tracemalloc
    raw, receiver, code = _hostile_headers()[name]
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as info:
            decode([raw], receiver=receiver)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == code, info.value
    assert peak < 2 * 1024 * 1024, f"{name}: {peak / 2**20:.1f} MiB allocated before the refusal"


def test_limits_still_admit_the_largest_legal_messages():
    largest_query = [bytes(f) for f in encode(make("QUERY", transfer_id="t" * 128, start=2**38 - 1,
                                                   hashes=[HASH] * 4096))]
    for receiver in ("broker", "node", None):
        assert len(decode(largest_query, receiver=receiver)["hashes"]) == 4096
    doc = {"agents": [{"device_id": f"d{i}", "transfers": list(range(20))} for i in range(5000)]}
    reply = [bytes(f) for f in encode(make("STATUS_REPLY", status=doc))]
    assert decode(reply, receiver="operator")["status"] == doc
    with pytest.raises(RemoteProtocolError) as info:  # no broker nor node ever receives a document
        decode(reply, receiver="broker")
    assert info.value.code == "too_large"
    error = make("ERROR", code="bad_chunk", reason="é" * 1000, ref="x" * 32)
    assert decode(encode(error)) == error


def test_socket_frame_limits_come_from_the_schemas():
    from schemas.limits import CURVE_FRAME_OVERHEAD, max_frame_for
    from schemas.messages import MAX_CHUNK_SIZE, MAX_WIRE_CHUNK, SMALL_HEADER
    assert MAX_WIRE_CHUNK == MAX_CHUNK_SIZE + MAX_CHUNK_SIZE // 256  # zstd's bound for the largest chunk
    assert max_frame_for("broker", "agent") == MAX_WIRE_CHUNK + CURVE_FRAME_OVERHEAD  # a CHUNK
    assert max_frame_for("broker", "node") == MAX_WIRE_CHUNK + CURVE_FRAME_OVERHEAD  # a BLOCK
    assert max_frame_for("broker", "operator") == SMALL_HEADER + CURVE_FRAME_OVERHEAD  # STATUS, LIST
    assert max_frame_for("node") == max_frame_for("agent") == MAX_WIRE_CHUNK + CURVE_FRAME_OVERHEAD
