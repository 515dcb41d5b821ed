"""Garbage collection on the storage core (issue 12, part 3): mark and sweep against the manifests on
disk, the ownership compaction, and uploads in flight, on a fake clock with pool work run in a seeded
order (tests/corenode.py).

A manifest is removed the way the broker's retention will have the node remove it (its PRUNE is built
on another branch): the file goes from the node's manifest store, `drop_manifest` below. GC takes the
manifests on disk as the only references whatever removed one.
"""

import os
import random

import blake3
import pytest

from roles.storenode.gcwork import sweep
from roles.storenode.gcpins import Pins
from roles.storenode.ownership import DeviceChunks
from tests.corenode import CoreNode

CHUNK = 4096
GC_S = 5.0


def name_of(raw):
    return blake3.blake3(raw).digest()


def drop_manifest(node, device, snapshot, dataset="ds"):
    """What the broker's PRUNE does on the node: the manifest file leaves the store."""
    (node.manifests.root / device / dataset / f"{snapshot}.manifest").unlink()


def chunk_files(node) -> set:
    return {bytes.fromhex(p.name) for p in node.chunks.root.glob("*/*") if len(p.name) == 64}


def referenced(node) -> set:
    return {n for d in (p.name for p in node.manifests.root.iterdir())
            for m in node.manifests.all_for_device(d) for n in m.chunks if n is not None}


class Upload:
    """One snapshot's upload as the broker and agent drive it: OPEN, one QUERY, the CHUNKs asked
    for, COMMIT once every one is STORED."""

    def __init__(self, node, device, snapshot, raws):
        self.node, self.device, self.snapshot, self.raws = node, device, snapshot, raws
        self.tid = f"{device}-{snapshot}"
        self.to_send: list = []
        self.unstored: set = set()
        self.state = "new"

    def step(self) -> bool:
        """Send the next message, if one is due; False when waiting on the node."""
        node, tid = self.node, self.tid
        if self.state == "new":
            node.send("OPEN", transfer_id=tid, device_id=self.device, dataset="ds", snapshot=self.snapshot,
                      image_size=len(self.raws) * CHUNK, chunk_size=CHUNK, chunk_count=len(self.raws))
            node.send("QUERY", transfer_id=tid, start=0, hashes=[name_of(r) for r in self.raws])
            self.state = "querying"
            return True
        if self.state == "sending" and self.to_send:
            raw = self.to_send.pop()
            node.send("CHUNK", payload=[raw], transfer_id=tid, hash=name_of(raw), raw_len=CHUNK, codec="raw")
            return True
        if self.state == "sending" and not self.unstored:
            node.send("COMMIT", transfer_id=tid, image_blake3=blake3.blake3(b"".join(self.raws)).digest())
            self.state = "committing"
            return True
        return False

    def receive(self, msg) -> None:
        if msg.t == "OPENED":
            return
        if msg.t == "MISSING":
            self.to_send = [self.raws[i] for i in msg["missing"]]
            self.unstored = {name_of(r) for r in self.to_send}
            self.state = "sending"
        elif msg.t == "STORED":
            self.unstored.discard(msg["hash"])
        elif msg.t == "COMMITTED":
            self.state = "committed"
        else:
            raise AssertionError(f"{self.tid}: {msg.t} {dict(msg.items()) if hasattr(msg, 'items') else msg}")


def route(node, uploads) -> None:
    by_tid = {u.tid: u for u in uploads}
    for msg in node.take_sent():
        if msg.get("transfer_id") is not None:  # not the node's own reports (VERIFY_REPORT)
            by_tid[msg["transfer_id"]].receive(msg)


def run_all(node, uploads) -> None:
    while True:
        moved = any([u.step() for u in uploads])
        moved = node.run_store() or node.run_image() or moved
        route(node, uploads)
        if not moved:
            break
    assert [u.state for u in uploads] == ["committed"] * len(uploads)


def asked_for(node, device, snapshot, raws) -> list:
    """What negotiation asks a new upload of these chunks to send (sorted)."""
    upload = Upload(node, device, snapshot, raws)
    upload.step()
    node.settle()
    route(node, [upload])
    return sorted(upload.to_send)


def gc_once(node) -> None:
    runs = node.core.gc.runs
    node.advance(GC_S)
    node.settle()
    assert node.core.gc.runs == runs + 1


def chunks(tag: str, count: int) -> list:
    return [f"{tag}-{i}".encode().ljust(CHUNK, b".") for i in range(count)]


# --- mark and sweep --------------------------------------------------------------------------------

def test_an_unreferenced_chunk_goes_and_a_referenced_one_never_does(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    only_old, shared, only_new = chunks("old", 3), chunks("shared", 2), chunks("new", 2)
    run_all(node, [Upload(node, "dev", "s0", only_old + shared)])
    run_all(node, [Upload(node, "dev", "s1", shared + only_new)])
    gc_once(node)
    assert chunk_files(node) == {name_of(r) for r in only_old + shared + only_new}  # all referenced
    drop_manifest(node, "dev", "s0")
    gc_once(node)
    assert chunk_files(node) == {name_of(r) for r in shared + only_new}
    stats = node.core.statistics()
    assert (stats.gc_runs, stats.gc_deleted_chunks) == (2, 3)
    assert stats.gc_freed_bytes == 3 * (CHUNK + 8)  # header and raw chunk, per file
    assert stats.chunks_on_disk == len(shared + only_new)
    # negotiation no longer counts what went: a new upload is asked for exactly those chunks
    assert asked_for(node, "dev", "s2", only_old + shared) == sorted(only_old)


def test_a_chunk_another_device_references_survives_but_stops_counting_for_the_one_that_dropped_it(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    common = chunks("common", 2)
    run_all(node, [Upload(node, "a", "s0", common)])
    run_all(node, [Upload(node, "b", "s0", common)])
    drop_manifest(node, "a", "s0")
    gc_once(node)
    assert chunk_files(node) == {name_of(r) for r in common}  # b still references them
    # a is asked for them again: whether b holds them is not a's to learn
    assert asked_for(node, "a", "s1", common) == sorted(common)


def test_a_chunk_negotiated_present_for_an_open_upload_survives_until_it_commits(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    old = chunks("old", 3)
    run_all(node, [Upload(node, "dev", "s0", old)])
    upload = Upload(node, "dev", "s1", old + chunks("new", 1))
    upload.step()
    node.settle()
    route(node, [upload])
    assert len(upload.to_send) == 1  # the three old chunks: the cloud has them
    drop_manifest(node, "dev", "s0")
    gc_once(node)
    assert {name_of(r) for r in old} <= chunk_files(node)
    run_all(node, [upload])
    assert node.manifests.load("dev", "ds", "s1").chunks == tuple(name_of(r) for r in upload.raws)
    gc_once(node)
    assert chunk_files(node) == {name_of(r) for r in upload.raws}


def test_what_an_aborted_upload_held_goes_once_it_ends(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    raws = chunks("x", 3)
    upload = Upload(node, "dev", "s0", raws)
    upload.step()
    node.settle()
    route(node, [upload])
    while upload.to_send:
        upload.step()
        node.settle()
        route(node, [upload])
    assert upload.state == "sending" and not upload.unstored  # all stored, not committed
    gc_once(node)
    assert chunk_files(node) == {name_of(r) for r in raws}  # held by the open upload
    node.send("ABORT", transfer_id=upload.tid)
    gc_once(node)
    assert chunk_files(node) == set()
    assert node.owners.loaded("dev") == set()
    assert (node.owners.root / "dev.log").read_bytes() == b""


@pytest.mark.parametrize("seed", range(5))
def test_gc_racing_uploads_that_share_chunks_with_a_dropped_snapshot(tmp_path, seed):
    """GC runs start while uploads query, store and commit, and pool work runs in a seeded order:
    every upload commits, no manifest ever lacks a chunk, and once quiet the store holds exactly what
    the manifests reference and each device owns exactly what its own manifests name."""
    rng = random.Random(seed)
    node = CoreNode(tmp_path, gc_interval_s=GC_S, seed=seed)
    pool = chunks("p", 48)
    run_all(node, [Upload(node, "dev", "s0", pool[:32]), Upload(node, "other", "s0", pool[24:40])])
    drop_manifest(node, "dev", "s0")
    uploads = [Upload(node, "dev", "s1", rng.sample(pool, 16) + chunks(f"n{seed}", 8)),
               Upload(node, "dev", "s2", rng.sample(pool, 12)),
               Upload(node, "other", "s1", rng.sample(pool, 12) + chunks(f"o{seed}", 4))]
    node.advance(GC_S)  # a run starts before any of them
    for _ in range(10_000):
        choice = rng.random()
        if choice < 0.3:
            any(u.step() for u in rng.sample(uploads, len(uploads)))
        elif choice < 0.8:
            node.run_store()
        elif choice < 0.95:
            node.run_image()
        else:
            node.advance(GC_S)  # another run, or the one going goes on
        route(node, uploads)
        assert all(node.chunks.has(n) for n in referenced(node)), "a committed manifest lacks a chunk"
        if all(u.state == "committed" for u in uploads) and not node.store and not node.image:
            break
    assert [u.state for u in uploads] == ["committed"] * 3
    gc_once(node)
    assert chunk_files(node) == referenced(node)
    for device in ("dev", "other"):
        own = {n for m in node.manifests.all_for_device(device) for n in m.chunks if n is not None}
        assert node.owners.loaded(device) == own
        assert DeviceChunks(tmp_path, committed_chunks=lambda d: (
            n for m in node.manifests.all_for_device(d) for n in m.chunks)).load(device) == own


def test_a_crash_after_any_slice_leaves_every_manifest_whole_and_the_next_run_converges(tmp_path):
    """kill -9 between any two slices (the node's state gone, its disk as left): every manifest
    keeps its chunks, and a fresh node's run ends where an uninterrupted one does."""
    base = CoreNode(tmp_path / "probe", gc_interval_s=GC_S)
    slices = _setup_for_crash(base)
    base.advance(GC_S)
    while base.run_store():
        slices += 1
    for cut in sorted({1, 2, 3, 4, 5, 6, slices - 1, *random.Random(7).sample(range(1, slices), 8)}):
        root = tmp_path / f"cut{cut}"
        node = CoreNode(root, gc_interval_s=GC_S)
        _setup_for_crash(node)
        node.advance(GC_S)
        for _ in range(cut):
            node.run_store()
        node.core.close()  # the process dies here: a log being replaced stays the old one
        assert referenced(node) <= chunk_files(node)
        fresh = CoreNode(root, gc_interval_s=GC_S)
        gc_once(fresh)
        assert chunk_files(fresh) == referenced(fresh)
        assert asked_for(fresh, "dev", "later", chunks("kept", 2) + chunks("gone", 2)) == sorted(chunks("gone", 2))


def _setup_for_crash(node) -> int:
    run_all(node, [Upload(node, "dev", "s0", chunks("gone", 3) + chunks("kept", 2))])
    run_all(node, [Upload(node, "dev", "s1", chunks("kept", 2))])
    drop_manifest(node, "dev", "s0")
    return 0


# --- the sweep and the pins, alone --------------------------------------------------------------------

def test_a_name_released_during_a_run_is_held_until_the_run_ends(tmp_path):
    node = CoreNode(tmp_path)
    raw = chunks("late", 1)[0]
    node.chunks.put(name_of(raw), CHUNK, "raw", raw)
    directory = node.chunks.path_for(name_of(raw)).parent
    pins = Pins()
    pins.begin_run()
    pins.pin("t", "dev", [name_of(raw), None])
    pins.release("t")  # committed after the mark read its device: its manifest is not in `referenced`
    assert sweep(directory, set(), pins) == (0, 0, True)  # still pinned until drained
    assert not pins.drain()
    assert sweep(directory, set(), pins) == (0, 0, True)
    assert set().union(*pins.held_by("dev")) == {name_of(raw)}
    pins.end_run()
    assert sweep(directory, set(), pins) == (1, CHUNK + 8, True)


def test_appends_while_a_log_is_replaced_follow_the_new_log(tmp_path):
    owners = DeviceChunks(tmp_path)
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    owners.add("dev", a)
    owners.add("dev", b)
    owners.begin_rewrite("dev")
    owners.add("dev", c)  # a chunk stored while the new log is written
    owners.write_log("dev", [b])
    owners.end_rewrite("dev")
    owners.close()
    assert (tmp_path / "owners" / "dev.log").read_bytes() == b + c
    assert not [p for p in (tmp_path / "owners").iterdir() if p.name.startswith(".")]
    assert DeviceChunks(tmp_path).load("dev") == {b, c}


def test_a_run_is_not_started_twice_and_a_failed_slice_sweeps_nothing(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    run_all(node, [Upload(node, "dev", "s0", chunks("a", 2))])
    drop_manifest(node, "dev", "s0")
    (node.manifests.root / "dev" / "ds" / "bad.manifest").write_bytes(b"\xc1 not msgpack")
    node.advance(GC_S)
    assert node.core.gc.running and node.core.gc.start() == []
    node.settle()
    assert (node.core.gc.runs, node.core.gc.failed_runs) == (0, 1)
    assert len(chunk_files(node)) == 2  # what the damaged manifest named is unknown: nothing swept
    os.unlink(node.manifests.root / "dev" / "ds" / "bad.manifest")
    gc_once(node)
    assert chunk_files(node) == set()


def test_a_sweep_slice_deletes_at_most_its_limit_and_the_directory_is_taken_again(tmp_path):
    node = CoreNode(tmp_path)
    directory = node.chunks.root / "ab"
    names = [bytes([0xab, i]) + bytes(30) for i in range(5)]
    for name in names:
        node.chunks.path_for(name).write_bytes(b"x")
    keep = {names[0]}
    pins = Pins()
    assert sweep(directory, keep, pins, limit=3) == (3, 3, False)
    assert sweep(directory, keep, pins, limit=3) == (1, 1, True)
    assert sweep(directory, keep, pins, limit=3) == (0, 0, True)
    assert {p.name for p in directory.iterdir()} == {names[0].hex()}


def test_a_device_whose_manifest_directory_and_log_are_gone_stops_owning_what_they_named(tmp_path):
    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    raws = chunks("a", 2)
    run_all(node, [Upload(node, "dev", "s0", raws)])
    run_all(node, [Upload(node, "other", "s0", raws)])  # keeps the files
    drop_manifest(node, "dev", "s0")
    (node.manifests.root / "dev" / "ds").rmdir()
    (node.manifests.root / "dev").rmdir()
    node.owners.begin_rewrite("dev")  # close its handle, as a compaction would, and remove the log
    (node.owners.root / "dev.log").unlink()
    node.owners.end_rewrite("dev")
    gc_once(node)
    assert node.owners.loaded("dev") == set()
    assert chunk_files(node) == {name_of(r) for r in raws}


def test_a_device_that_comes_in_while_its_log_is_replaced_is_narrowed_too(tmp_path):
    first = CoreNode(tmp_path, gc_interval_s=GC_S)
    dropped, kept = chunks("dropped", 2), chunks("kept", 1)
    run_all(first, [Upload(first, "dev", "s0", dropped)])
    run_all(first, [Upload(first, "dev", "s1", kept)])
    run_all(first, [Upload(first, "other", "s0", dropped)])  # keeps the files
    drop_manifest(first, "dev", "s0")
    first.core.close()
    node = CoreNode(tmp_path, gc_interval_s=GC_S)  # restarted: no device in memory
    node.advance(GC_S)
    while not any(e.key[:3] == ("gc", "log", "dev") for e in node.store):
        assert node.run_store()
    node.send("OPEN", transfer_id="t", device_id="dev", dataset="ds", snapshot="s2", image_size=CHUNK,
              chunk_size=CHUNK, chunk_count=1)  # reads the log still in place
    assert {name_of(r) for r in dropped} <= node.owners.loaded("dev")
    node.settle()
    assert node.owners.loaded("dev") == {name_of(r) for r in kept}


def test_a_large_upload_is_unpinned_in_batches_and_stays_protected_until_drained(tmp_path):
    pins = Pins()
    names = [i.to_bytes(32, "big") for i in range(10_000)]
    pins.pin("big", "dev", names[:6000])
    pins.pin("big", "dev", names[4000:] + [None])
    pins.pin("other", "dev2", names[:10])
    assert len(pins) == 10_000
    pins.begin_run()
    pins.release("big")
    assert set().union(*pins.held_by("dev")) == set(names)  # still being un-pinned: kept by the compaction too
    assert pins.drain(4096)
    assert 10_000 - 4096 <= len(pins) < 10_000
    while pins.drain(4096):
        pass
    assert len(pins) == 10  # what the other upload holds
    with pins.lock:
        assert all(pins.protected(n) for n in names)  # held to the end of the run
    pins.end_run()
    with pins.lock:
        assert [n for n in names if pins.protected(n)] == names[:10]


def test_a_scrape_of_the_node_counts_gc_runs_and_what_they_freed(tmp_path):
    from roles import metrics
    from tests.test_unit_metrics import scrape, served

    node = CoreNode(tmp_path, gc_interval_s=GC_S)
    run_all(node, [Upload(node, "dev", "s0", chunks("a", 3))])
    drop_manifest(node, "dev", "s0")
    gc_once(node)
    publisher = served(metrics.StorageMetrics, node.core)
    try:
        publisher.tick(node.now)
        n = scrape(publisher)
    finally:
        publisher.close()
    assert n[("speedsync_storage_gc_runs_total", ())] == 1
    assert n[("speedsync_storage_gc_deleted_chunks_total", ())] == 3
    assert n[("speedsync_storage_gc_freed_bytes_total", ())] == 3 * (CHUNK + 8)
    assert n[("speedsync_storage_chunks", ())] == 0
