"""Chunk arithmetic, in one place: counts, lengths and slices agree at the edges."""

import pytest

from bus.errors import RequestError
from roles.chunkdata import decode_and_verify, pack_chunk_header, parse_chunk_file
from roles.geometry import ImageGeometry

import blake3


@pytest.mark.parametrize("size,chunk,count,last", [(0, 4096, 0, 0), (1, 4096, 1, 1), (4096, 4096, 1, 4096),
                                                    (4097, 4096, 2, 1), (10 * 4096, 4096, 10, 4096)])
def test_counts_and_lengths(size, chunk, count, last):
    g = ImageGeometry(size, chunk)
    assert g.chunk_count == count
    if count:
        assert g.chunk_len(count - 1) == last
        assert sum(g.chunk_len(i) for i in range(count)) == size
    assert g.chunk_len(count) == 0
    assert g.slice_len(0, count + 5) == size


def test_slice_len_matches_the_sum_of_its_chunks():
    g = ImageGeometry(10 * 4096 + 100, 4096)
    for start in range(12):
        for n in range(12):
            assert g.slice_len(start, n) == sum(g.chunk_len(i) for i in range(start, min(start + n, 11)))


def test_validate_refuses_a_count_that_does_not_cover_the_image():
    with pytest.raises(RequestError) as info:
        ImageGeometry(8192, 4096).validate(3)
    assert info.value.code == "bad_field"


def test_decode_and_verify_accepts_only_the_named_bytes():
    raw = b"x" * 5000
    name = blake3.blake3(raw).digest()
    assert decode_and_verify("raw", raw, len(raw), name) == raw
    with pytest.raises(RequestError):
        decode_and_verify("raw", raw[:-1] + b"y", len(raw), name)
    with pytest.raises(RequestError):
        decode_and_verify("raw", raw, len(raw) + 1, name)
    blob = pack_chunk_header("raw", len(raw)) + raw
    codec, raw_len, payload = parse_chunk_file(blob)
    assert (codec, raw_len, bytes(payload)) == ("raw", len(raw), raw)
    with pytest.raises(ValueError):
        parse_chunk_file(b"SC")
