"""The agent's Upload and the storage node's logic joined by an in-memory link.

No sockets, no threads: pool work runs when the test says so. This checks
the protocol logic end to end: only missing chunks travel, within credit,
de-duplicated per device, and the committed manifest rebuilds the image.
"""

import dataclasses
import os
import random
from collections import deque

import blake3
import pytest

from bus.errors import RequestError
from roles.appliance.chunker import ImageHasher
from roles.appliance.restore import ImageWriter
from roles.appliance.scanner import PendingSnapshot
from roles.appliance.upload import Upload
from roles.config import DatasetConfig
from roles.storenode.assembly import PieceAssembler
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.manifests import ManifestStore
from roles.storenode.ownership import DeviceChunks
from roles.storenode.sessions import UploadSession
from roles.storenode.verify import hash_pieces
from schemas import decode, encode

CHUNK = 64 * 1024


class MemoryNode:
    """The storage node's logic objects, answering messages synchronously."""

    def __init__(self, root):
        self.chunks = ChunkStore(root)
        self.manifests = ManifestStore(root)
        self.owners = DeviceChunks(root)
        self.sessions = {}
        self.chunks_received = 0
        self.assembler = PieceAssembler()

    def open(self, tid, device, upload):
        self.sessions[tid] = UploadSession(tid, device, upload.pending.dataset.name, upload.pending.snapshot,
                                           upload.image_size, upload.chunk_size, upload.chunk_count,
                                           hasher=blake3.blake3())

    def handle(self, msg):
        s = self.sessions[msg["transfer_id"]]
        if msg.t == "QUERY":
            missing = s.record_slice(msg["start"], msg["hashes"], lambda n: self.owners.owns(s.device_id, n))
            return [("MISSING", msg["start"], missing)]
        if msg.t == "CHUNK":
            s.expected_len(msg["hash"], msg["raw_len"])
            payload = self.assembler.add(s.transfer_id, msg["hash"], msg.get("offset"), msg.get("total"),
                                         bytes(msg.payload[0]))
            if payload is None:
                return []
            raw = self.chunks.put(msg["hash"], msg["raw_len"], msg["codec"], payload)
            self.owners.add(s.device_id, msg["hash"])
            s.stored(msg["hash"], raw)
            self.chunks_received += 1
            return [("STORED", msg["hash"], msg["raw_len"], len(payload))]
        if msg.t == "COMMIT":
            s.require_complete()
            # the storage node's commit path: the image hashed in order as
            # chunks arrive, checked against the agent's blake3 when it sent one (not under CBT)
            digest = commit_digest(self.chunks, s, lambda n: self.owners.owns(s.device_id, n))
            if msg["image_blake3"] is not None:
                assert digest == msg["image_blake3"]
            manifest = dataclasses.replace(s.manifest(), image_blake3=digest)
            self.manifests.save(manifest)
            return [("COMMITTED", manifest.image_blake3)]
        raise AssertionError(msg.t)


def commit_digest(store, session, owns) -> bytes:
    session.hasher = session.hasher or blake3.blake3()
    hash_pieces(session.hasher, store, session.hashable_pieces(owns))
    assert session.fully_hashed
    return session.hasher.digest()


def run_upload(node, device, dataset, path, snapshot, credit_step=3 * CHUNK, seed=0, known=None):
    rng = random.Random(seed)
    tasks, wire, image_tasks = deque(), deque(), deque()
    hasher = ImageHasher()
    ds = DatasetConfig(name=dataset, path=os.path.dirname(path), chunk_size=CHUNK)
    pending = PendingSnapshot(ds, snapshot, path, os.path.getsize(path))

    def send(message):
        wire.append(decode(encode(message)))  # through the real codec

    upload = Upload(pending, lambda key, fn, *a: tasks.append((key, fn, a)), send,
                    lambda pieces, final: image_tasks.append((hasher, pieces, final)),
                    max_held_bytes=8 * CHUNK, known=known)
    upload.on_accept("t-" + snapshot, committed=False)
    node.open("t-" + snapshot, device, upload)
    piece_limit = rng.choice([16 * 1024, 1 << 30])  # paced pieces, or whole chunks
    for _ in range(100000):
        if upload.finished:
            break
        while upload.next_piece(piece_limit) is not None:  # the agent's WireScheduler, in short
            upload.send_piece(piece_limit, 0.0)
        if image_tasks and rng.random() < 0.3:
            # the whole-image hasher is one thread: strictly in order
            result = _image_step(*image_tasks.popleft())
            if result is not None:
                upload.on_image_digest(result)
        elif tasks and (not wire or rng.random() < 0.5):
            # pool results come back in any order
            key, fn, args = tasks.pop() if rng.random() < 0.3 else tasks.popleft()
            result = fn(*args)
            if key[0] == "hash":
                upload.on_hashed(key[1], result)
            else:
                upload.on_compressed(*result)
        elif wire:
            msg = wire.popleft()
            for reply in node.handle(msg):
                if reply[0] == "MISSING":
                    upload.on_missing(reply[1], reply[2])
                    upload.on_credit(credit_step * max(1, len(reply[2])))
                elif reply[0] == "STORED":
                    upload.on_stored(reply[1], reply[2], reply[3])
                else:
                    upload.on_committed(reply[1])
        elif image_tasks:
            continue
        else:
            raise AssertionError("stalled: nothing to do and not finished")
    assert upload.state == "committed", upload.reason
    return upload


def _image_step(hasher, pieces, final):
    hasher.update(pieces)
    return hasher.digest() if final else None


def write_image(path, chunks, seed, zero_every=3, tail=1000):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(chunks):
            f.write(bytes(CHUNK) if i % zero_every == zero_every - 1 else rng.randbytes(CHUNK))
        f.write(rng.randbytes(tail))


def restore_from(node, device, dataset, snapshot, out):
    m = node.manifests.load(device, dataset, snapshot)
    with ImageWriter(out) as writer:
        writer.on_image(m.image_size, m.chunk_size, m.chunk_count, m.image_blake3)
        for i, name in enumerate(m.chunks):
            if name is None:
                writer.on_block(i, None, m.chunk_len(i), "raw", None)
            else:
                codec, raw_len, payload = node.chunks.read_stored(name)
                writer.on_block(i, name, raw_len, codec, payload)
        writer.finish()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_full_then_incremental_sends_only_changes(tmp_path, seed):
    node = MemoryNode(tmp_path / "node")
    img = tmp_path / "s1.img"
    write_image(img, 30, seed)
    first = run_upload(node, "dev", "ds", str(img), "s1", seed=seed)
    assert first.chunks_sent == 20 + 1  # non-zero chunks plus the tail
    data = bytearray(img.read_bytes())
    for index in (1, 7, 29):
        data[index * CHUNK + 100] ^= 0xFF
    img2 = tmp_path / "s2.img"
    img2.write_bytes(bytes(data))
    second = run_upload(node, "dev", "ds", str(img2), "s2", seed=seed)
    assert second.chunks_sent == 3
    out = tmp_path / "out.img"
    restore_from(node, "dev", "ds", "s2", out)
    assert blake3.blake3(out.read_bytes()).digest() == blake3.blake3(bytes(data)).digest()


def test_deduplication_is_per_device(tmp_path):
    node = MemoryNode(tmp_path / "node")
    img = tmp_path / "s1.img"
    write_image(img, 10, 5, zero_every=100)
    assert run_upload(node, "dev-a", "ds", str(img), "s1").chunks_sent == 11
    assert run_upload(node, "dev-a", "other", str(img), "s1").chunks_sent == 0
    # another device holding the same data must send it: it cannot learn it exists
    assert run_upload(node, "dev-b", "ds", str(img), "s1").chunks_sent == 11


def test_commit_refuses_chunks_the_device_never_stored(tmp_path):
    node = MemoryNode(tmp_path / "node")
    s = UploadSession("t", "dev", "ds", "s1", CHUNK, CHUNK, 1)
    name = blake3.blake3(b"x").digest()
    s.record_slice(0, [name], lambda n: True)  # as if the device owned it: nothing asked
    s.require_complete()
    with pytest.raises(RequestError):
        commit_digest(node.chunks, s, lambda n: True)


def test_damaged_chunk_makes_restore_fail_without_output(tmp_path):
    node = MemoryNode(tmp_path / "node")
    img = tmp_path / "s1.img"
    write_image(img, 6, 9, zero_every=100)
    run_upload(node, "dev", "ds", str(img), "s1")
    m = node.manifests.load("dev", "ds", "s1")
    victim = node.chunks.path_for(m.chunks[2])
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0x55
    victim.write_bytes(bytes(blob))
    out = tmp_path / "out.img"
    with pytest.raises(RequestError):
        try:
            restore_from(node, "dev", "ds", "s1", out)
        finally:
            assert not out.exists()
    assert not any(p.name.endswith(".restoring") for p in tmp_path.iterdir())


def test_changed_block_tracking_reads_only_changed_chunks(tmp_path):
    node = MemoryNode(tmp_path / "node")
    img = tmp_path / "s1.img"
    write_image(img, 40, 11)
    first = run_upload(node, "dev", "ds", str(img), "s1")
    data = bytearray(img.read_bytes())
    changed = {4, 17}
    for index in changed:
        data[index * CHUNK + 7] ^= 0x01
    img2 = tmp_path / "s2.img"
    img2.write_bytes(bytes(data))
    known = {i: name for i, name in enumerate(first.names) if i not in changed and i < 40}
    second = run_upload(node, "dev", "ds", str(img2), "s2", known=known)
    assert second.chunks_sent == 2
    # the changed chunks and the short tail chunk (not in `known`) are read: nothing else
    assert second.bytes_read == 2 * CHUNK + 1000
    out = tmp_path / "out.img"
    restore_from(node, "dev", "ds", "s2", out)
    assert out.read_bytes() == bytes(data)
    assert node.manifests.load("dev", "ds", "s2").image_blake3 == blake3.blake3(bytes(data)).digest()
