"""End to end: restores under the broker's credit, checked against the catalog,
failing cleanly (real broker, storage and `speedsync restore` processes).

- an agent that stops reading holds at most the broker's `restore_window` in
  flight, is timed out (`stalled`) and freed; a second restore of the same
  device past `restores_per_device` is refused `over_budget`;
- a node whose manifest lies about the chunk count or the size (with a
  blake3 forged to match its lie) fails the restore: the catalog decides;
- a node that serves other chunks than the image's (each matching its own
  name) fails on the whole-image blake3 (the mutation check's test);
- a symlink planted at the temporary path is not followed;
- a stream that stops (the node frozen, the broker still beating) fails the
  restore with a reason within `restore_idle_timeout_ms`, no file left;
- a read error on the node fails that restore only; the node serves on.
"""

from __future__ import annotations

import os
import signal
import time

import blake3
import msgpack
import zmq

from roles.sampleimages import file_blake3, generate_image
from schemas import decode, encode, make
from tests.harness import MiB, assert_restores, vm_rss_bytes

WINDOW = 4 * MiB


def committed(cluster, device: str, size: int, seed: int, dataset: str = "fs", snapshot: str = "s1", **agent):
    """Write an image, replicate it with `agent --once`; returns (agent config, image path, blake3 hex)."""
    directory = cluster.dataset_dir(device, dataset)
    image = directory / f"{snapshot}.img"
    digest = generate_image(str(image), size, seed=seed, zero_fraction=0.0, text_fraction=0.0)
    cfg = cluster.agent_config(device, [{"name": dataset, "path": directory}], **agent)
    rc, _, log = cluster.run_agent_once(cfg)
    assert rc == 0, log
    return cfg, image, digest


def manifest_path(cluster, device: str, dataset: str = "fs", snapshot: str = "s1"):
    return cluster.node_dir("node-a") / "manifests" / device / dataset / f"{snapshot}.manifest"


def leftovers(out) -> list:
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


def restore_failed(cluster, cfg, out, *reason_parts: str) -> str:
    result = cluster.restore(cfg, "fs", "s1", out, timeout_s=120)
    assert result.rc == 1, str(result)
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, str(result)
    for part in reason_parts:
        assert part in last, f"{part!r} not in {last!r}"
    assert leftovers(out) == [], f"a failed restore left {leftovers(out)}"
    return last


class SilentReader:
    """A device that asks for a restore, reads a few blocks, then stops reading
    (its receive queue one message deep) while it keeps sending heartbeats."""

    def __init__(self, ctx, endpoint: str, device: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        self.sock.connect(endpoint)
        self.sock.send_multipart(encode(make("HELLO", device_id=device)))
        assert self.next().t == "WELCOME"

    def send(self, t: str, **fields) -> None:
        self.sock.send_multipart(encode(make(t, **fields)))

    def next(self, timeout_s: float = 20):
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = decode(self.sock.recv_multipart())
            if msg.t != "HEARTBEAT":
                return msg
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"nothing from the broker within {timeout_s}s")

    def close(self) -> None:
        self.sock.close()


def test_an_agent_that_stops_reading_holds_at_most_the_window_and_is_timed_out(cluster, zctx):
    cluster.start_broker(restore_window="4MiB", restore_idle_timeout_ms=3000, restores_per_device=1)
    cluster.start_storage()
    image_size = 160 * MiB
    cfg, _, digest = committed(cluster, "office-1", image_size, seed=11)
    broker_pid = cluster.procs["broker"].pid
    idle_rss = vm_rss_bytes(broker_pid)

    reader = SilentReader(zctx, cluster.frontend, "office-1")
    reader.send("RESTORE", req=1, dataset="fs", snapshot="s1", window=2**34)  # asks for 16 GiB
    accept = reader.next()
    assert accept.t == "ACCEPT", accept
    tid = accept["transfer_id"]
    assert reader.next().t == "IMAGE"
    for _ in range(10):  # read and acknowledged, as an honest agent does
        block = reader.next()
        assert block.t == "BLOCK", block
        reader.send("CREDIT", transfer_id=tid, bytes=len(block.payload[0]))

    def restore_entry():
        return next((t for t in cluster.transfers("office-1") if t["transfer_id"] == tid), None)

    peak_in_flight, peak_rss = 0, 0

    def stuck_with_window_full():
        nonlocal peak_in_flight, peak_rss
        reader.send("HEARTBEAT")  # alive, only not reading
        entry = restore_entry()
        peak_rss = max(peak_rss, vm_rss_bytes(broker_pid))
        if entry is None or entry["state"] != "restoring":
            return True
        peak_in_flight = max(peak_in_flight, entry["in_flight_bytes"])
        assert entry["window"] == WINDOW, entry
        assert entry["in_flight_bytes"] <= WINDOW, entry
        return entry["in_flight_bytes"] > WINDOW - 2 * MiB

    cluster.wait_for(stuck_with_window_full, 30, "the restore's window full and the agent not reading")
    assert restore_entry()["state"] == "restoring", "the broker let the whole image through"
    assert WINDOW - 2 * MiB < peak_in_flight <= WINDOW
    # one more restore of this device is over its budget; nothing is made for it
    second = SilentReader(zctx, cluster.frontend, "office-1")
    second.send("RESTORE", req=2, dataset="fs", snapshot="s1", window=WINDOW)
    refusal = second.next()
    assert refusal.t == "ERROR" and refusal["code"] == "over_budget", refusal
    second.close()

    def gone():
        reader.send("HEARTBEAT")
        entry = restore_entry()
        if entry is not None and entry["state"] == "restoring":
            stuck_with_window_full()
        return entry is not None and entry["state"] != "restoring"

    cluster.wait_for(gone, 30, "the stalled restore timed out")
    entry = restore_entry()
    assert entry["state"] == "failed" and entry["reason"].startswith("stalled:"), entry
    assert entry["in_flight_bytes"] == 0, entry
    status = cluster.status()
    node = next(n for n in status["storage"] if n["node_id"] == "node-a")
    assert node["restore_in_flight_bytes"] == 0 and status["broker"]["restore_in_flight_bytes"] == 0
    assert status["broker"]["errors_by_code"].get("stalled", 0) >= 1
    assert WINDOW - 2 * MiB < peak_in_flight <= WINDOW
    # the broker held a window, not the image: far less than what a 16 GiB window would have let in
    assert peak_rss - idle_rss < image_size // 4, (peak_rss - idle_rss) / MiB
    # the agent is told, behind the blocks it never read
    while (msg := reader.next()).t == "BLOCK":
        pass
    assert msg.t == "ERROR" and msg["code"] == "stalled", msg
    reader.close()
    # and the device restores normally afterwards: the slot and the node's stream were freed
    out = cluster.root / "restored" / "s1.img"
    out.parent.mkdir()
    result = cluster.restore(cfg, "fs", "s1", out)
    assert result.rc == 0, str(result)
    assert file_blake3(str(out)) == digest


def _rewrite_manifest(path, **changes) -> bytes:
    original = path.read_bytes()
    doc = msgpack.unpackb(original, raw=False)
    doc.update(changes)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    return original


def test_a_node_that_lies_about_chunk_count_or_size_fails_the_restore_without_a_file(cluster, tmp_path):
    cluster.start()
    chunk_size = 1 * MiB
    cfg, image, digest = committed(cluster, "office-1", 8 * MiB, seed=21)
    data = image.read_bytes()
    path = manifest_path(cluster, "office-1")
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    out = tmp_path / "restored" / "s1.img"
    out.parent.mkdir()

    # one chunk short, with the blake3 of what it would send
    original = _rewrite_manifest(path, chunks=doc["chunks"][:-1], image_blake3=blake3.blake3(data[:7 * chunk_size]).digest())
    restore_failed(cluster, cfg, out, "7 chunks")
    # the same lie made consistent: 7 chunks, 7 MiB, and their blake3 (only the catalog can tell)
    _rewrite_manifest(path, image_size=7 * chunk_size)
    restore_failed(cluster, cfg, out, f"{7 * chunk_size} bytes, the catalog {8 * chunk_size}")
    # one chunk more (a zero chunk) and a size to match, with the blake3 of that image
    _rewrite_manifest(path, chunks=doc["chunks"] + [None], image_size=9 * chunk_size,
                      image_blake3=blake3.blake3(data + bytes(chunk_size)).digest())
    restore_failed(cluster, cfg, out, "bytes, the catalog")
    assert cluster.status()["broker"]["errors_by_code"].get("catalog_mismatch", 0) >= 3

    path.write_bytes(original)
    assert_restores(cluster, cfg, "fs", "s1", digest, tmp_path)


def test_chunks_that_are_not_the_image_fail_on_the_whole_image_blake3(cluster, tmp_path):
    """Each block matches its own name, the IMAGE matches the catalog, but the node serves
    chunks 0 and 1 swapped: only the whole-image check can tell (the mutation check's test)."""
    cluster.start()
    cfg, _, digest = committed(cluster, "office-1", 4 * MiB, seed=31)
    path = manifest_path(cluster, "office-1")
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    chunks = list(doc["chunks"])
    assert chunks[0] and chunks[1] and chunks[0] != chunks[1]
    chunks[0], chunks[1] = chunks[1], chunks[0]
    _rewrite_manifest(path, chunks=chunks)
    out = tmp_path / "restored" / "s1.img"
    out.parent.mkdir()
    restore_failed(cluster, cfg, out, "does not match its blake3")


def test_a_symlink_planted_at_the_temporary_path_is_not_followed(cluster, tmp_path):
    cluster.start()
    cfg, _, digest = committed(cluster, "office-1", 3 * MiB, seed=41)
    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    out = out_dir / "s1.img"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    tmp = out_dir / f".{out.name}.restoring"
    tmp.symlink_to(victim)

    result = cluster.restore(cfg, "fs", "s1", out)
    assert result.rc == 0, str(result)
    assert victim.read_bytes() == b"precious\n", "the restore wrote through a planted symlink"
    assert not out.is_symlink() and file_blake3(str(out)) == digest
    assert not os.path.lexists(tmp)

    # a temporary left by a restore killed with -9 is removed by the next one
    out.unlink()
    tmp.write_bytes(b"half an image")
    result = cluster.restore(cfg, "fs", "s1", out)
    assert result.rc == 0, str(result)
    assert not os.path.lexists(tmp) and file_blake3(str(out)) == digest


def test_a_stopped_stream_fails_the_restore_with_a_reason_and_no_file(cluster, tmp_path):
    # The broker keeps beating to the restore (a frozen node stays "alive" for a long while,
    # and the broker's own idle timeout is far away): only the client's clock can end it.
    cluster.start_broker(heartbeat_liveness=1000, restore_idle_timeout_ms=600000)
    cluster.start_storage()
    cfg, _, digest = committed(cluster, "office-1", 2 * MiB, seed=51, restore_idle_timeout_ms=2000)
    out = tmp_path / "restored" / "s1.img"
    out.parent.mkdir()
    node = cluster.procs["node-a"]
    os.kill(node.pid, signal.SIGSTOP)
    try:
        last = restore_failed(cluster, cfg, out, "stream stopped", "2s")
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert last.startswith("speedsync restore: ")
    assert_restores(cluster, cfg, "fs", "s1", digest, tmp_path)


def test_a_read_error_fails_that_restore_and_the_node_serves_on(cluster, tmp_path):
    cluster.start(fault_fail_at_read=3)
    cfg, _, digest = committed(cluster, "office-1", 6 * MiB, seed=61)
    out = tmp_path / "restored" / "s1.img"
    out.parent.mkdir()
    restore_failed(cluster, cfg, out, "injected disk error")
    failed = [t for t in cluster.transfers("office-1") if t["kind"] == "restore" and t["state"] == "failed"]
    assert failed and failed[0]["reason"].startswith("storage_error:") and "chunk 2" in failed[0]["reason"], failed
    assert cluster.running("node-a")
    # the node serves another device's upload and restore, and this device's restore, afterwards
    other_cfg, _, other_digest = committed(cluster, "office-2", 3 * MiB, seed=62)
    assert_restores(cluster, other_cfg, "fs", "s1", other_digest, tmp_path)
    assert_restores(cluster, cfg, "fs", "s1", digest, tmp_path)

