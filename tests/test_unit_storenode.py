"""Storage logic without sockets: chunk store, manifests, the image cursor."""

import os

import blake3
import pytest
import zstandard

from bus.errors import RequestError
from roles.storenode.chunkstore import ChunkStore
from roles.durable import TEMP_SUFFIX, remove_temp_files, write_durable
from roles.storenode.manifests import ManifestStore
from roles.storenode.uploads import UploadSession
from roles.storenode.verify import hash_pieces

CHUNK = 4096


def name_of(raw):
    return blake3.blake3(raw).digest()


def test_a_chunk_that_does_not_match_its_name_is_not_stored(tmp_path):
    store = ChunkStore(tmp_path)
    raw = os.urandom(1000)
    with pytest.raises(RequestError) as info:
        store.put(name_of(b"other"), 1000, "raw", raw)
    assert info.value.code == "bad_chunk"
    assert not any(p.is_file() for p in (tmp_path / "chunks").rglob("*"))


@pytest.mark.parametrize("payload,raw_len", [(b"\x28\xb5\x2f\xfd garbage", 100), (None, 50)])
def test_undecodable_or_wrong_length_payload_is_bad_chunk(tmp_path, payload, raw_len):
    store = ChunkStore(tmp_path)
    raw = b"a" * 100
    payload = payload or zstandard.ZstdCompressor().compress(raw)
    with pytest.raises(RequestError) as info:
        store.put(name_of(raw), raw_len, "zstd", payload)
    assert info.value.code == "bad_chunk"


@pytest.mark.parametrize("content_size", [True, False])
def test_a_decompression_bomb_is_refused_before_its_output_is_allocated(tmp_path, content_size):
    # 7 KiB of zstd that inflate to 256 MiB, announced as a 1 MiB chunk: refused, and never more than the
    # announced length held (python-zstandard sizes its output by the frame's own content size, if any)
    import tracemalloc
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=content_size).compress(bytes(256 << 20))
    store = ChunkStore(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as info:
            store.put(name_of(bytes(1 << 20)), 1 << 20, "zstd", bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "bad_chunk"
    assert peak < 4 << 20, f"{peak} bytes held decoding a bomb"


def test_stored_chunk_reads_back_verified(tmp_path):
    store = ChunkStore(tmp_path)
    raw = b"hello " * 1000
    packed = zstandard.ZstdCompressor().compress(raw)
    assert store.put(name_of(raw), len(raw), "zstd", packed) == raw
    assert store.read_raw(name_of(raw)) == raw
    assert store.read_stored(name_of(raw))[0] == "zstd"


def test_manifest_paths_refuse_traversal(tmp_path):
    """A manifest is planted where each bad id would lead, so without the id check the load
    would succeed: only `bad_id` (not `not_found`) passes."""
    from roles.storenode.manifests import Manifest
    manifests = ManifestStore(tmp_path)
    planted = Manifest("dev", "planted", "s1", 4096, 4096, bytes(32), (None,)).to_bytes()
    for bad in ("../x", "a/b", "", ".."):
        target = manifests.root / "dev" / bad / "s1.manifest"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(planted)
        with pytest.raises(RequestError) as info:
            manifests.load("dev", bad, "s1")
        assert info.value.code == "bad_id", (bad, info.value)
    assert not (tmp_path.parent / "x").exists()


def test_durable_write_leaves_only_the_final_name(tmp_path):
    target = tmp_path / "f"
    write_durable(target, [b"ab", b"cd"])
    assert target.read_bytes() == b"abcd"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    (tmp_path / f".g.1234{TEMP_SUFFIX}").write_bytes(b"half")
    assert remove_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_failing_write_hook_leaves_nothing(tmp_path):
    def disk_full(nbytes):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_durable(tmp_path / "f", [b"x"], disk_full)
    assert list(tmp_path.iterdir()) == []


def test_image_cursor_hashes_in_order_whatever_the_arrival_order(tmp_path):
    store = ChunkStore(tmp_path)
    chunks = [os.urandom(CHUNK), bytes(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(100)]
    image = b"".join(chunks)
    names = [None if c == bytes(len(c)) else name_of(c) for c in chunks]
    owned = {names[3]}  # stored earlier by this device
    store.put(names[3], CHUNK, "raw", chunks[3])
    s = UploadSession("t", "dev", "ds", "s1", len(image), CHUNK, len(chunks))
    hasher = blake3.blake3()
    missing = s.record_slice(0, names, owned.__contains__)
    assert missing == [0, 2, 4]
    fed = []
    for index in (4, 2, 0):  # arrive in reverse
        store.put(names[index], len(chunks[index]), "raw", chunks[index])
        owned.add(names[index])
        s.stored(names[index], chunks[index])
        pieces = s.hashable_pieces(owned.__contains__)
        fed.extend(p[0] for p in pieces)
        hash_pieces(hasher, store, pieces)
    assert fed == [0, 1, 2, 3, 4]
    assert s.fully_hashed and not s.arrived
    assert hasher.digest() == blake3.blake3(image).digest()


def test_scrub_quarantines_damage_and_names_the_snapshot(tmp_path):
    from roles.storenode.manifests import Manifest
    from roles.storenode.scrub import scrub

    store, manifests = ChunkStore(tmp_path), ManifestStore(tmp_path)
    chunks = [os.urandom(CHUNK) for _ in range(3)]
    names = [store.put(name_of(c), CHUNK, "raw", c) and name_of(c) for c in chunks]
    manifests.save(Manifest("dev", "ds", "s1", 3 * CHUNK, CHUNK, name_of(b"".join(chunks)), tuple(names)))
    assert scrub(tmp_path).problems == 0
    victim = store.path_for(names[1])
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 1
    victim.write_bytes(bytes(blob))
    report = scrub(tmp_path)
    assert [c["chunk"] for c in report.damaged_chunks] == [names[1].hex()]
    assert report.affected_snapshots == [{"device_id": "dev", "dataset": "ds", "snapshot": "s1",
                                          "chunks": [names[1].hex()]}]
    assert not store.has(names[1]) and (tmp_path / "quarantine" / names[1].hex()).exists()
    store.put(names[1], CHUNK, "raw", chunks[1])  # a later upload heals it
    assert scrub(tmp_path).problems == 0
