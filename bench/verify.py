"""Background verification throughput, by hand: `python -m bench.verify [--mib 256]`; and what it costs
the uploads beside it: `python -m bench.verify --cost [--upload-mib 512] [--stored-mib 512] [--rounds 3]`
(also `bench/lifecycle.py --verify-cost`).

Builds a chunk store of random 1 MiB chunks (zstd level 1, as agents send
them) in a temporary directory, then re-verifies it with the node's own
slices (roles/storenode/background.py, unthrottled) and prints the rate
against two baselines measured in the same run on the same files: reading
them only, and reading + decompressing + blake3 (what verification cannot
avoid). The page cache is warm for all three (the files were just written),
so these are CPU figures; a cold disk is slower and the read limit is what
bounds it in production.

The cost (`upload_cost`): the real commands (tests/harness.py Cluster: a broker, one storage node, an
agent on loopback). A stored set of snapshots is uploaded first. Then the same upload of fresh data (a
new dataset each time) is timed alternately with the node's verification idle (verify_read_limit at its
minimum, 4 KiB/s: nothing to speak of is read) and running continuously over everything stored
(verify_interval_ms 100, verify_read_limit at its default, so passes run back to back), the node
restarted between runs with the other setting: base, verify, base, verify..., so that drift on a shared
machine falls on both. Printed: each run's upload rate (the transfer's own `seconds` in the agent's
--json), the verify/base ratio of the medians, the node's CPU seconds per upload and the verification
rate achieved meanwhile (the node's verify_bytes_read in status, over the upload).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3
import zstandard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from roles.chunkdata import decode_payload, parse_chunk_file  # noqa: E402
from roles.storenode.background import Verifier  # noqa: E402
from roles.storenode.chunkstore import ChunkStore  # noqa: E402
from roles.storenode.manifests import Manifest, ManifestStore  # noqa: E402

MiB = 1024 * 1024


def build(root: Path, mib: int) -> list:
    chunks, manifests = ChunkStore(root), ManifestStore(root)
    compressor = zstandard.ZstdCompressor(level=1)
    names, hasher = [], blake3.blake3()
    for i in range(mib):
        raw = os.urandom(MiB // 2) + bytes(MiB // 2)  # half compressible, as real images are
        name = blake3.blake3(raw).digest()
        chunks.put(name, len(raw), "zstd", compressor.compress(raw))
        names.append(name)
        hasher.update(raw)
    manifests.save(Manifest("bench", "ds", "s1", mib * MiB, MiB, hasher.digest(), tuple(names)))
    return [chunks.path_for(n) for n in names]


IDLE_READ_LIMIT = 4096  # the config's minimum: one chunk file read, then the next slice is minutes away
DEVICE, NODE = "office-1", "node-a"


def _node_figures(cluster) -> dict:
    return next(n for n in cluster.status()["storage"] if n["node_id"] == NODE)


def _start_node(cluster, verifying: bool):
    """(Re)start the node, verification running continuously or idle; returns when it reads (or is idle)."""
    if NODE in cluster.procs:
        assert cluster.terminate(NODE) == 0, cluster.log_tails()
    overrides = {"verify_interval_ms": 100, "log_level": "INFO"}
    if not verifying:
        overrides["verify_read_limit"] = IDLE_READ_LIMIT
    proc = cluster.start_storage(NODE, **overrides)
    if verifying:
        cluster.wait_for(lambda: _node_figures(cluster).get("verify_bytes_read", 0) > 0, 30,
                         "background verification under way")
    return proc


def _upload(cluster, index: int, mib: int) -> dict:
    from roles.localprocs import cpu_seconds
    from roles.sampleimages import generate_image
    dataset = f"up{index}"
    ds = cluster.dataset_dir(DEVICE, dataset)
    generate_image(str(ds / "s1.img"), mib * MiB, seed=1000 + index, zero_fraction=0.0)
    cfg = cluster.agent_config(DEVICE, [{"name": dataset, "path": ds}], config_name=dataset, log_level="INFO")
    node_pid = cluster.procs[NODE].pid
    cpu0, read0 = cpu_seconds(node_pid), _node_figures(cluster).get("verify_bytes_read", 0)
    started = time.monotonic()
    rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=600)
    wall = time.monotonic() - started
    cpu1 = cpu_seconds(node_pid)
    read1 = _node_figures(cluster).get("verify_bytes_read", 0)  # as the node last reported it: both ends lag alike
    assert rc == 0 and doc, stderr[-2000:]
    (transfer,) = [t for t in doc["transfers"] if t["dataset"] == dataset]
    assert transfer["state"] == "committed", transfer
    (ds / "s1.img").unlink()  # the node has it; the page cache and the disk need not
    return {"seconds": transfer["seconds"], "bytes_image": transfer["bytes_image"],
            "mb_per_s": transfer["bytes_image"] / 1e6 / transfer["seconds"], "node_cpu_s": cpu1 - cpu0,
            "verify_bytes_read": read1 - read0, "wall_s": wall}


def upload_cost(upload_mib: int = 512, stored_mib: int = 512, rounds: int = 3, log=sys.stdout) -> dict:
    """Uploads timed with the node's background verification idle and running; see the module's docstring."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from harness import Cluster
    from roles.sampleimages import generate_image
    work = Path(tempfile.mkdtemp(prefix="speedsync-verifycost-"))
    cluster = Cluster(work)
    try:
        cluster.start_broker(log_level="INFO")
        _start_node(cluster, verifying=False)
        stored = cluster.dataset_dir(DEVICE, "stored")
        for i in range(4):  # the set verification walks: a few snapshots, as a node holds
            generate_image(str(stored / f"s{i}.img"), stored_mib * MiB // 4, seed=i, zero_fraction=0.0)
        cfg = cluster.agent_config(DEVICE, [{"name": "stored", "path": stored}], config_name="stored",
                                   log_level="INFO")
        rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=600)
        assert rc == 0 and doc and all(t["state"] == "committed" for t in doc["transfers"]), stderr[-2000:]
        runs = {"base": [], "verify": []}
        index = 0
        for _ in range(rounds):
            for mode in ("base", "verify"):
                _start_node(cluster, verifying=mode == "verify")
                index += 1
                run = _upload(cluster, index, upload_mib)
                runs[mode].append(run)
                print(f"  {mode:<6} upload {run['bytes_image'] / 1e6:.0f} MB in {run['seconds']:.2f} s = "
                      f"{run['mb_per_s']:.0f} MB/s; node CPU {run['node_cpu_s']:.1f} s; verification read "
                      f"{run['verify_bytes_read'] / 1e6:.0f} MB meanwhile", file=log, flush=True)
        base = statistics.median(r["mb_per_s"] for r in runs["base"])
        verify = statistics.median(r["mb_per_s"] for r in runs["verify"])
        verify_rate = statistics.median(r["verify_bytes_read"] / r["wall_s"] for r in runs["verify"])
        return {"upload_mib": upload_mib, "stored_mib": stored_mib, "rounds": rounds, "runs": runs,
                "base_mb_per_s": base, "verify_mb_per_s": verify, "ratio": verify / base,
                "verify_read_mb_per_s": verify_rate / 1e6,
                "node_cpu_s": {m: statistics.median(r["node_cpu_s"] for r in rs) for m, rs in runs.items()}}
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_cost(cost: dict) -> None:
    print(f"uploads of {cost['upload_mib']} MiB of fresh data beside background verification of "
          f"{cost['stored_mib']} MiB stored (+ the uploads), {cost['rounds']} rounds, medians:")
    print(f"  verification idle:    {cost['base_mb_per_s']:6.0f} MB/s (node CPU {cost['node_cpu_s']['base']:.1f} s "
          "per upload)")
    print(f"  verification running: {cost['verify_mb_per_s']:6.0f} MB/s (node CPU "
          f"{cost['node_cpu_s']['verify']:.1f} s) = {cost['ratio']:.2f} x idle; verification read "
          f"{cost['verify_read_mb_per_s']:.0f} MB/s meanwhile (verify_read_limit default 50 MB/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--cost", action="store_true", help="the cost to uploads beside it, real processes")
    parser.add_argument("--upload-mib", type=int, default=512)
    parser.add_argument("--stored-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.cost:
        print_cost(upload_cost(args.upload_mib, args.stored_mib, args.rounds))
        return
    print_throughput(throughput(args.mib))


def throughput(mib: int = 256) -> dict:
    """Background verification of a fresh store of `mib` chunks, in-process, against two baselines."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, mib)
        start = time.perf_counter()
        for path in paths:
            path.read_bytes()
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        for path in paths:
            codec, raw_len, payload = parse_chunk_file(path.read_bytes())
            blake3.blake3(decode_payload(codec, payload, raw_len)).digest()
        hash_s = time.perf_counter() - start

        verifier = Verifier(ChunkStore(root), ManifestStore(root), root, read_limit=10**12, interval_s=3600.0,
                            now=0.0)
        start = time.perf_counter()
        slices = 0
        while verifier.passes == 0:
            now = verifier.next_due()  # the read limit is out of reach: only the slices' own work paces
            for submit in verifier.on_time(now):
                slices += 1
                effects, _ = verifier.completed(submit.key, submit.fn(*submit.args), None, now)
                for effect in effects:
                    effect.fn(*effect.args)
        verify_s = time.perf_counter() - start
        assert verifier.verified_snapshots == 1 and not verifier.damaged
    image = mib * MiB
    return {"mib": mib, "slices": slices, "read_mb_per_s": image / read_s / 1e6,
            "hash_mb_per_s": image / hash_s / 1e6, "verify_mb_per_s": image / verify_s / 1e6}


def print_throughput(f: dict) -> None:
    print(f"background verification in-process, image {f['mib']} MiB, {f['slices']} slices, warm page cache:")
    print(f"  read only:            {f['read_mb_per_s']:8.0f} MB/s (image bytes)")
    print(f"  read+decode+blake3:   {f['hash_mb_per_s']:8.0f} MB/s")
    print(f"  background verify:    {f['verify_mb_per_s']:8.0f} MB/s  = "
          f"{f['verify_mb_per_s'] / f['hash_mb_per_s']:.2f} x read+decode+blake3, "
          f"{f['verify_mb_per_s'] / f['read_mb_per_s']:.2f} x read only")


if __name__ == "__main__":
    main()
