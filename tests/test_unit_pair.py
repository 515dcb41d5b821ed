"""The agent's Upload and the real StorageCore joined by an in-memory link.

No sockets, no threads: every message goes through the real codec, and pool
work (the agent's and the node's) runs when the test says so, in a seeded
random order (the node's store pool in any order, its image thread in
order). This checks the protocol logic end to end: only missing chunks
travel, within credit, de-duplicated per device, the committed manifest
rebuilds the image, and a restore stays within the agent's credit.
"""

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
from tests.corenode import CoreNode

CHUNK = 64 * 1024


def make_node(root, seed=0):
    return CoreNode(root, seed=seed)


def _node_replies(node, upload, credit_step):
    for reply in node.take_sent():
        if reply.t == "MISSING":
            upload.on_missing(reply["start"], list(reply["missing"]))
            upload.on_credit(credit_step * max(1, len(reply["missing"])))
        elif reply.t == "STORED":
            upload.on_stored(reply["hash"], reply["raw_len"], reply["wire_len"])
        elif reply.t == "COMMITTED":
            upload.on_committed(reply["image_blake3"])
        elif reply.t == "ERROR":
            raise RequestError(reply["reason"], reply["code"])
        else:
            assert reply.t == "OPENED", reply


def run_upload(node, device, dataset, path, snapshot, credit_step=3 * CHUNK, seed=0, known=None):
    rng = random.Random(seed)
    tasks, wire, image_tasks = deque(), deque(), deque()
    hasher = ImageHasher()
    ds = DatasetConfig(name=dataset, path=os.path.dirname(path), chunk_size=CHUNK)
    pending = PendingSnapshot(ds, snapshot, path, os.path.getsize(path))
    tid = f"t-{device}-{dataset}-{snapshot}"

    upload = Upload(pending, lambda key, fn, *a: tasks.append((key, fn, a)), wire.append,
                    lambda pieces, final: image_tasks.append((hasher, pieces, final)),
                    max_held_bytes=8 * CHUNK, known=known)
    upload.on_accept(tid, committed=False)
    node.send("OPEN", transfer_id=tid, device_id=device, dataset=dataset, snapshot=snapshot,
              image_size=upload.image_size, chunk_size=upload.chunk_size, chunk_count=upload.chunk_count)
    piece_limit = rng.choice([16 * 1024, 1 << 30])  # paced pieces, or whole chunks
    for _ in range(200000):
        if upload.finished:
            break
        while upload.next_piece(piece_limit) is not None:  # the agent's WireScheduler, in short
            upload.send_piece(piece_limit, 0.0)
        roll = rng.random()
        if image_tasks and roll < 0.2:
            # the whole-image hasher is one thread: strictly in order
            result = _image_step(*image_tasks.popleft())
            if result is not None:
                upload.on_image_digest(result)
        elif tasks and roll < 0.5:
            # pool results come back in any order
            key, fn, args = tasks.pop() if rng.random() < 0.3 else tasks.popleft()
            result = fn(*args)
            if key[0] == "hash":
                upload.on_hashed(key[1], result)
            else:
                upload.on_compressed(*result)
        elif (node.store or node.image) and roll < 0.7:
            if not (rng.random() < 0.5 and node.run_image()):
                node.run_store() or node.run_image()
        elif wire:
            node.deliver(wire.popleft())
        elif node.sent:
            pass
        elif tasks or image_tasks or node.store or node.image:
            continue
        else:
            raise AssertionError("stalled: nothing to do and not finished")
        _node_replies(node, upload, credit_step)
    assert upload.state == "committed", upload.reason
    assert not node.core.uploads, "the committed upload is forgotten"
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


def restore_from(node, device, dataset, snapshot, out, window=2 * CHUNK):
    """READ through the core; CREDIT back as blocks are written. The node never
    sends more payload than the credit granted."""
    tid = f"r-{device}-{dataset}-{snapshot}"
    node.send("READ", transfer_id=tid, device_id=device, dataset=dataset, snapshot=snapshot, window=window)
    granted, used = window, 0
    with ImageWriter(out) as writer:
        for _ in range(100000):
            if writer.complete:
                break
            for reply in node.take_sent():
                if reply.t == "ERROR":
                    raise RequestError(reply["reason"], reply["code"])
                if reply.t == "IMAGE":
                    writer.on_image(reply["image_size"], reply["chunk_size"], reply["chunk_count"],
                                    reply["image_blake3"])
                    continue
                assert reply.t == "BLOCK", reply
                payload = reply.payload[0] if reply.payload else None
                used += len(payload) if payload is not None else 0
                assert used <= granted, "a restore exceeded the agent's credit"
                back = writer.on_block(reply["index"], reply["hash"], reply["raw_len"], reply["codec"], payload)
                if back:
                    granted += back
                    node.send("CREDIT", transfer_id=tid, bytes=back)
            if not node.sent and not writer.complete and not (node.run_store() or node.run_image()):
                raise AssertionError("restore stalled")
        writer.finish()
    assert not node.core.pump.sessions, "the finished restore is forgotten"
    node.send("CREDIT", transfer_id=tid, bytes=CHUNK)  # late credit: not an error
    assert not node.take_sent()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_full_then_incremental_sends_only_changes(tmp_path, seed):
    node = make_node(tmp_path / "node", seed)
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
    node = make_node(tmp_path / "node")
    img = tmp_path / "s1.img"
    write_image(img, 10, 5, zero_every=100)
    assert run_upload(node, "dev-a", "ds", str(img), "s1").chunks_sent == 11
    assert run_upload(node, "dev-a", "other", str(img), "s1").chunks_sent == 0
    # another device holding the same data must send it: it cannot learn it exists
    assert run_upload(node, "dev-b", "ds", str(img), "s1").chunks_sent == 11


def test_commit_refuses_chunks_the_device_never_stored(tmp_path):
    """The chunk is on disk, stored by another device: the file's presence must not count.
    Negotiation asks this device for it (ownership, not the disk, decides), and a COMMIT that
    skips it is refused and writes no manifest."""
    node = make_node(tmp_path / "node")
    raw = os.urandom(CHUNK)
    name = blake3.blake3(raw).digest()
    node.chunks.put(name, CHUNK, "raw", raw)
    node.owners.add("other", name)  # stored by another device
    node.send("OPEN", transfer_id="t-1", device_id="dev", dataset="ds", snapshot="s1", image_size=CHUNK,
              chunk_size=CHUNK, chunk_count=1)
    node.send("QUERY", transfer_id="t-1", start=0, hashes=[name])
    node.settle()
    assert [(m.t, m.get("missing")) for m in node.take_sent()] == [("OPENED", None), ("MISSING", [0])]
    node.send("COMMIT", transfer_id="t-1", image_blake3=blake3.blake3(raw).digest())  # without sending it
    node.settle()
    assert node.chunks.path_for(name).exists(), "the chunk must be on disk: only ownership refuses it"
    [error] = node.take_sent()
    assert (error.t, error["code"]) == ("ERROR", "bad_state") and "still to be sent" in error["reason"]
    assert not node.manifests.exists("dev", "ds", "s1")
    assert not node.owners.owns("dev", name)


def test_commit_refuses_a_chunk_gone_from_disk_since_negotiation(tmp_path):
    node = make_node(tmp_path / "node")
    raw = os.urandom(CHUNK)
    name = blake3.blake3(raw).digest()
    node.chunks.put(name, CHUNK, "raw", raw)
    node.owners.add("dev", name)  # stored by this device before: nothing is asked
    node.send("OPEN", transfer_id="t-1", device_id="dev", dataset="ds", snapshot="s1", image_size=CHUNK,
              chunk_size=CHUNK, chunk_count=1)
    node.send("QUERY", transfer_id="t-1", start=0, hashes=[name])
    node.settle()
    assert [(m.t, m.get("missing")) for m in node.take_sent()] == [("OPENED", None), ("MISSING", [])]
    node.chunks.path_for(name).unlink()  # quarantined by a scrub since
    node.send("COMMIT", transfer_id="t-1", image_blake3=blake3.blake3(raw).digest())
    node.settle()
    [error] = node.take_sent()
    assert (error.t, error["code"], error["ref"]) == ("ERROR", "commit_failed", "COMMIT")
    assert not node.manifests.exists("dev", "ds", "s1")


def test_damaged_chunk_makes_restore_fail_without_output(tmp_path):
    node = make_node(tmp_path / "node")
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
    node = make_node(tmp_path / "node")
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
