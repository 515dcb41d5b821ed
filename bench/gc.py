"""Garbage collection bench: time and peak memory of one GC run per 100,000 chunks (run by hand).

    python bench/gc.py [--chunks 100000] [--live 0.5] [--devices 4] [--manifests 40] [--workdir DIR]

Builds a synthetic store of small chunk files (`chunks/<hh>/<name>`, a 72-byte file each), `devices`
devices' manifests that reference the `live` fraction of them (each manifest a random half of its
device's share, so names repeat across manifests as snapshots do), and an ownership log per device
naming every chunk it stored. Then runs the node's real GarbageCollector, each slice called in turn
as the store pool would (no loop, no sockets), twice on fresh copies of the store: once timed, once
under tracemalloc for the peak Python heap of the run. Prints per run, and per 100,000 chunks:
seconds, the longest slice (what one store thread is held for), loop-side seconds (what the node's
loop spends in the collector), peak bytes and bytes per live chunk; and as baselines from the same
run: a bare walk of the store (scandir of every chunks/<hh>/) and reading every manifest, each
timed alone, with the run's time as a ratio of them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from roles.chunkdata import pack_chunk_header  # noqa: E402
from roles.storenode.chunkstore import SUBDIRS, ChunkStore  # noqa: E402
from roles.storenode.gc import GarbageCollector  # noqa: E402
from roles.storenode.gcpins import Pins  # noqa: E402
from roles.storenode.manifests import Manifest, ManifestStore  # noqa: E402
from roles.storenode.ownership import DeviceChunks  # noqa: E402

CHUNK_SIZE = 4096


def build(root: Path, chunks: int, live: float, devices: int, manifests: int, seed: int) -> int:
    """The synthetic store; returns how many chunks the manifests reference."""
    rng = random.Random(seed)
    store = ChunkStore(root)
    names = [rng.randbytes(32) for _ in range(chunks)]
    header = pack_chunk_header("raw", 64)
    for name in names:
        with open(store.path_for(name), "wb") as f:
            f.write(header + bytes(64))
    live_names = names[:int(chunks * live)]
    share = -(-len(live_names) // devices)
    store_manifests = ManifestStore(root)
    referenced = set()
    (root / "owners").mkdir(exist_ok=True)
    for d in range(devices):
        device = f"dev{d}"
        mine = live_names[d * share:(d + 1) * share]
        per = max(1, manifests // devices)
        for m in range(per):
            picked = mine if m == per - 1 else rng.sample(mine, len(mine) // 2)  # the newest names them all
            referenced.update(picked)
            store_manifests.save(Manifest(device, "ds", f"s{m:04d}", len(picked) * CHUNK_SIZE, CHUNK_SIZE,
                                          bytes(32), tuple(picked)))
        garbage = names[len(live_names):][d::devices]
        (root / "owners" / f"{device}.log").write_bytes(b"".join(mine + garbage))
    return len(referenced)


def run_gc(root: Path) -> dict:
    chunks, manifests = ChunkStore(root), ManifestStore(root)
    owners = DeviceChunks(root)
    gc = GarbageCollector(chunks, manifests, owners, Pins())
    longest = loop_s = 0.0
    longest_step = ""
    start = time.perf_counter()
    t = time.perf_counter()
    effects = gc.start()
    loop_s += time.perf_counter() - t
    while effects:
        (effect,) = effects
        t = time.perf_counter()
        result = effect.fn(*effect.args)
        if time.perf_counter() - t > longest:
            longest, longest_step = time.perf_counter() - t, effect.key[1]
        t = time.perf_counter()
        effects = gc.completed(effect.key, result, None)
        loop_s += time.perf_counter() - t
    seconds = time.perf_counter() - start
    owners.close()
    assert gc.runs == 1, "the run failed"
    return {"seconds": seconds, "longest_slice_s": longest, "longest_step": longest_step, "loop_s": loop_s,
            "deleted": gc.deleted_chunks}


def walk(root: Path) -> float:
    start = time.perf_counter()
    for sub in SUBDIRS:
        for _ in os.scandir(root / "chunks" / sub):
            pass
    return time.perf_counter() - start


def read_manifests(root: Path) -> float:
    start = time.perf_counter()
    for path in (root / "manifests").glob("*/*/*.manifest"):
        Manifest.from_bytes(path.read_bytes())
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--live", type=float, default=0.5)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--manifests", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gc-bench-", dir=args.workdir))
    try:
        template = work / "template"
        live = build(template, args.chunks, args.live, args.devices, args.manifests, args.seed)
        per = 100_000 / args.chunks
        timed_root, traced_root = work / "timed", work / "traced"
        shutil.copytree(template, timed_root)
        shutil.copytree(template, traced_root)
        base_walk, base_read = walk(template), read_manifests(template)
        timed = run_gc(timed_root)
        tracemalloc.start()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        traced = run_gc(traced_root)
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        print(f"store: {args.chunks} chunks, {live} referenced by {args.manifests} manifests of "
              f"{args.devices} devices; deleted {timed['deleted']}")
        print(f"gc run: {timed['seconds']:.2f} s ({timed['seconds'] * per:.2f} s per 100,000 chunks), "
              f"longest slice {timed['longest_slice_s'] * 1000:.1f} ms ({timed['longest_step']}), "
              f"loop side {timed['loop_s'] * 1000:.1f} ms")
        print(f"peak heap: {peak / 1e6:.1f} MB ({peak * per / 1e6:.1f} MB per 100,000 chunks, "
              f"{peak / max(1, live):.0f} bytes per live chunk)")
        print(f"baselines: walk of the store {base_walk:.2f} s, reading every manifest {base_read:.2f} s; "
              f"gc / (walk + read) = {timed['seconds'] / (base_walk + base_read):.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
