"""The storage node's disk: directories made durable, ownership logs that stay whole and
bounded, committed manifests never overwritten (issue 11, items 6, 7 and 9).

The recording fault component (roles/storenode/faults.py, `sync_log`) writes a
line per fsync from inside the fsync, so removing a sync from roles/durable.py
removes its line and these tests fail. Descriptor and file-size limits are real
ones (resource.setrlimit), set in a child process so pytest keeps its own.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest

from bus.errors import RequestError
from roles.durable import make_dirs, write_durable
from roles.storenode.chunkstore import COPY_SUFFIX, ChunkStore
from roles.storenode.faults import DiskFaults
from roles.storenode.manifests import Manifest, ManifestStore
from roles.storenode.ownership import HASH_LEN, DeviceChunks
from tests.corenode import CoreNode

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096


def name_of(raw: bytes) -> bytes:
    return blake3.blake3(raw).digest()


def recorder(tmp_path) -> tuple[DiskFaults, Path]:
    log = tmp_path / "sync.log"
    return DiskFaults(sync_log=str(log)), log


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def run_child(code: str, timeout_s: float = 120) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


# --- directories ---------------------------------------------------------------------------------


def test_every_directory_made_is_fsynced_in_its_parent_after_it_is_made(tmp_path):
    io, log = recorder(tmp_path)
    base = tmp_path.resolve()
    make_dirs(base / "a" / "b" / "c", io)
    assert lines(log) == [f"mkdir {base}/a", f"fsync dir {base}",
                          f"mkdir {base}/a/b", f"fsync dir {base}/a",
                          f"mkdir {base}/a/b/c", f"fsync dir {base}/a/b"]
    make_dirs(base / "a" / "b" / "c", io)  # there already: nothing made, nothing to sync
    assert len(lines(log)) == 6


def test_node_stores_make_their_directories_durably(tmp_path):
    io, log = recorder(tmp_path)
    root = (tmp_path / "node").resolve()
    ChunkStore(root, io=io)
    ManifestStore(root, io=io)
    DeviceChunks(root, io=io)
    made = lines(log)
    for directory in (root, root / "chunks", root / "chunks" / "00", root / "chunks" / "ff", root / "manifests",
                      root / "owners"):
        i = made.index(f"mkdir {directory}")
        assert f"fsync dir {directory.parent}" in made[i + 1:], directory


def test_a_chunk_is_fsynced_renamed_and_its_directory_fsynced_before_put_returns_even_if_it_existed(tmp_path):
    """Name durability before STORED: a put of a chunk whose file exists (another device's, or
    another thread's rename) still ends with this put's own fsync, rename and directory fsync."""
    io, log = recorder(tmp_path)
    store = ChunkStore(tmp_path.resolve() / "node", io=io)
    raw = os.urandom(CHUNK)
    name = name_of(raw)
    final = store.path_for(name)
    for attempt in range(2):
        start = len(lines(log))
        assert store.store(name, CHUNK, "raw", raw)[1] == (CHUNK if attempt == 0 else 0)
        steps = lines(log)[start:]
        assert len(steps) == 3, steps
        synced, renamed, dir_synced = steps
        assert synced.startswith("fsync file ") and renamed.startswith("rename ")
        tmp, target = renamed.split()[1:]
        assert synced == f"fsync file {tmp}"
        assert Path(target).parent == final.parent
        assert (Path(target) == final) == (attempt == 0)  # the second: a write-shaped copy beside it
        assert dir_synced == f"fsync dir {final.parent}"
    assert final.read_bytes()[8:] == raw
    assert store.reap() == 1
    assert not [p for p in final.parent.iterdir() if p.name.endswith(COPY_SUFFIX)]


def test_copies_left_by_a_crash_are_reaped_at_start(tmp_path):
    store = ChunkStore(tmp_path)
    raw = os.urandom(CHUNK)
    store.store(name_of(raw), CHUNK, "raw", raw)
    store.store(name_of(raw), CHUNK, "raw", raw)
    assert ChunkStore(tmp_path).reap(everything=True) == 1  # a new process: found on disk
    assert [p.name for p in store.path_for(name_of(raw)).parent.iterdir()] == [name_of(raw).hex()]


def test_no_replace_write_never_overwrites(tmp_path):
    target = tmp_path / "m"
    write_durable(target, [b"first"], replace=False)
    with pytest.raises(FileExistsError):
        write_durable(target, [b"second"], replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# --- committed manifests ---------------------------------------------------------------------------


def manifest(chunks, snapshot="s1", blake=None) -> Manifest:
    return Manifest("dev", "ds", snapshot, len(chunks) * CHUNK, CHUNK, blake or bytes(32), tuple(chunks))


def test_a_committed_manifest_is_never_overwritten_and_the_same_one_again_is_a_no_op(tmp_path):
    store = ManifestStore(tmp_path)
    first = manifest([name_of(b"a"), None])
    store.save(first)
    store.save(first)  # idempotent
    for other in (manifest([name_of(b"b"), None]), manifest([name_of(b"a"), None], blake=b"\x01" * 32),
                  manifest([name_of(b"a")])):
        with pytest.raises(RequestError) as info:
            store.save(other)
        assert info.value.code == "conflict"
    assert store.load("dev", "ds", "s1") == first


def upload(node: CoreNode, tid: str, chunks: list[bytes], snapshot: str = "s1") -> list:
    names = [name_of(c) for c in chunks]
    node.send("OPEN", transfer_id=tid, device_id="dev", dataset="ds", snapshot=snapshot,
              image_size=len(chunks) * CHUNK, chunk_size=CHUNK, chunk_count=len(chunks))
    node.send("QUERY", transfer_id=tid, start=0, hashes=names)
    node.settle()
    missing = [m for m in node.sent if m.t == "MISSING"][-1]["missing"]
    for index in missing:
        node.send("CHUNK", payload=[chunks[index]], transfer_id=tid, hash=names[index], raw_len=CHUNK, codec="raw")
        node.settle()
    node.send("COMMIT", transfer_id=tid, image_blake3=None)
    node.settle()
    return [m for m in node.take_sent() if m.t in ("COMMITTED", "ERROR")]


def test_a_second_commit_of_a_snapshot_with_other_chunks_is_refused_with_conflict(tmp_path):
    node = CoreNode(tmp_path)
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    assert [m.t for m in upload(node, "t-1", [a, b])] == ["COMMITTED"]
    assert [m.t for m in upload(node, "t-2", [a, b])] == ["COMMITTED"]  # the same manifest: idempotent
    (refused,) = upload(node, "t-3", [b, a])
    assert (refused.t, refused["code"], refused["ref"]) == ("ERROR", "conflict", "COMMIT")
    assert node.manifests.load("dev", "ds", "s1").chunks == (name_of(a), name_of(b))


# --- ownership logs ----------------------------------------------------------------------------------


def test_ownership_logs_keep_a_bounded_number_of_handles_and_lose_no_record(tmp_path):
    owners = DeviceChunks(tmp_path, log_handles=8)
    names = [name_of(str(i).encode()) for i in range(3)]
    for name in names:
        for device in range(40):
            owners.add(f"dev-{device}", name)
            assert len(owners.logs) <= 8
    owners.close()
    again = DeviceChunks(tmp_path)
    assert all(again.load(f"dev-{d}") == set(names) for d in range(40))
    assert all((tmp_path / "owners" / f"dev-{d}.log").stat().st_size == 3 * HASH_LEN for d in range(40))


def test_a_torn_log_tail_is_cut_before_new_records_are_appended(tmp_path):
    owners = DeviceChunks(tmp_path)
    owners.add("dev", name_of(b"a"))
    owners.close()
    log = tmp_path / "owners" / "dev.log"
    with open(log, "ab") as f:
        f.write(b"\x07" * 11)  # a crash mid-record
    owners = DeviceChunks(tmp_path)
    owners.add("dev", name_of(b"b"))
    owners.close()
    assert log.read_bytes() == name_of(b"a") + name_of(b"b")


def test_a_full_log_refuses_the_record_and_leaves_the_log_and_the_set_unchanged(tmp_path):
    faults = DiskFaults(log_capacity=2 * HASH_LEN)
    owners = DeviceChunks(tmp_path, write_hook=faults.before_log_write)
    owners.add("dev", name_of(b"a"))
    owners.add("dev", name_of(b"b"))
    with pytest.raises(OSError) as info:
        owners.add("dev", name_of(b"c"))
    assert info.value.errno == errno.ENOSPC
    assert not owners.owns("dev", name_of(b"c"))
    assert (tmp_path / "owners" / "dev.log").read_bytes() == name_of(b"a") + name_of(b"b")


def test_a_short_write_at_the_file_size_limit_is_cut_back_to_whole_records(tmp_path):
    """A real short write, in a child: with RLIMIT_FSIZE at 48 bytes the second record's write
    is cut after 16 of its 32 bytes; the log goes back to the one whole record."""
    out = run_child(f"""
        import errno, resource, signal
        import blake3
        from roles.storenode.ownership import DeviceChunks
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        owners = DeviceChunks({str(tmp_path)!r})
        owners.add("dev", blake3.blake3(b"a").digest())
        resource.setrlimit(resource.RLIMIT_FSIZE, (48, resource.RLIM_INFINITY))
        try:
            owners.add("dev", blake3.blake3(b"b").digest())
        except OSError as exc:
            print("refused", errno.errorcode[exc.errno])
        print("owns", owners.owns("dev", blake3.blake3(b"b").digest()))
    """)
    assert out.split() == ["refused", "ENOSPC", "owns", "False"]
    assert (tmp_path / "owners" / "dev.log").read_bytes() == name_of(b"a")


def test_two_thousand_devices_on_one_node_under_a_low_descriptor_limit(tmp_path):
    """EMFILE: the node once kept a log open per device ever seen and died past ~1,024. Here 2,000
    devices store a chunk each under RLIMIT_NOFILE 200 with the default pool size (256, which the
    pool caps at a quarter of the limit so chunk writes keep descriptors). Then every
    descriptor is taken: the next chunk is refused with the reason, and once descriptors are
    free again the node serves on. All through the real StorageCore."""
    out = run_child(f"""
        import os, resource
        import blake3
        from tests.corenode import CoreNode
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        node = CoreNode({str(tmp_path)!r})

        def store(device, raw):
            name = blake3.blake3(raw).digest()
            tid = "t-" + device
            node.send("OPEN", transfer_id=tid, device_id=device, dataset="ds", snapshot="s1",
                      image_size=len(raw), chunk_size=4096, chunk_count=1)
            node.send("QUERY", transfer_id=tid, start=0, hashes=[name])
            node.settle()
            node.send("CHUNK", payload=[raw], transfer_id=tid, hash=name, raw_len=len(raw), codec="raw")
            node.settle()
            return [(m.t, m.get("code"), m.get("reason")) for m in node.take_sent() if m.t in ("STORED", "ERROR")]

        answers = [store(f"dev-{{i}}", b"shared" * 100 if i % 2 else os.urandom(600)) for i in range(2000)]
        print("stored", sum(a == [("STORED", None, None)] for a in answers))
        print("open-logs", len(node.owners.logs))
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print("starved", store("dev-starved", os.urandom(600)))
        for fd in hog:
            os.close(fd)
        print("after", store("dev-after", os.urandom(600)))
        node.owners.close()
    """, timeout_s=300)
    report = dict(line.split(" ", 1) for line in out.splitlines())
    assert report["stored"] == "2000", out
    assert int(report["open-logs"]) <= 50, out
    assert "storage_error" in report["starved"] and "Too many open files" in report["starved"], out
    assert report["after"] == "[('STORED', None, None)]", out
    owners = DeviceChunks(tmp_path)
    assert all(len(owners.load(f"dev-{i}")) == 1 for i in range(0, 2000, 37))


def test_a_pool_larger_than_the_process_allows_gives_handles_back_when_descriptors_run_out(tmp_path):
    out = run_child(f"""
        import resource
        import blake3
        from roles.storenode.ownership import DeviceChunks
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        owners = DeviceChunks({str(tmp_path)!r})
        owners.logs.limit = 10**6  # as if misconfigured past the cap
        for i in range(300):
            owners.add(f"dev-{{i}}", blake3.blake3(str(i).encode()).digest())
        print(len(owners.logs))
    """)
    assert int(out) < 64
    assert all((tmp_path / "owners" / f"dev-{i}.log").stat().st_size == HASH_LEN for i in range(300))
