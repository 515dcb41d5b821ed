"""Lifecycle bench (issue 12): a month of 5-minute snapshots against the retention policy, and GC cost.

    python bench/lifecycle.py [--days 30] [--every-min 5] [--datasets 3] [--chunks 256]
                              [--change 0.02] [--gc-chunks 100000] [--json]
                              [--verify-cost [--verify-upload-mib 512] [--verify-stored-mib 512] [--verify-rounds 3]]

1. A month, simulated on the broker's real retention rules (roles/retention.py, as the broker applies
   them every prune_interval_ms): one device, `--datasets` datasets, a snapshot of each every
   `--every-min` minutes (synthetic `taken_at`). Each image is `--chunks` chunks of 1 MiB; each snapshot
   rewrites `--change` of them, mostly the same hot ones (a database's working set: 80% of the changes
   fall on 10% of the chunks), as incrementals do. Pruning runs once an hour of simulated time; what the
   node then stores is the distinct chunks the kept snapshots reference (what GC leaves, exactly as the
   node's collector computes it: tests/test_e2e_gc.py shows the store converges to that set). Printed per
   day: catalog rows, rows kept by the policy against those ever taken, and stored bytes against what
   keeping every snapshot would store.
2. GC time and peak memory per 100,000 chunks: the node's real collector on a synthetic store
   (bench/gc.py's run, the same figures it prints).
3. With `--verify-cost`, background verification: its throughput in-process (`python -m bench.verify`
   prints it against read-only and read+decode+blake3 baselines), and how much it slows uploads beside
   it, with real processes (bench/verify.py's upload_cost: the same upload of fresh data through a real
   broker, node and agent on loopback, timed with the node's verification idle and running continuously
   at its default verify_read_limit over what is stored, interleaved base, verify, base, verify...; the
   ratio of the medians and the verification rate achieved meanwhile). About a minute per round.

The policy is the example of DESIGN.md: keep_last 3, hourly 24, daily 14, weekly 8, monthly 12, and
`sql*` datasets keep_last 288.
"""

from __future__ import annotations

import argparse
import calendar
import json
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

from bench.gc import build, run_gc  # noqa: E402
from bench.verify import print_cost, print_throughput, throughput, upload_cost  # noqa: E402
from roles.retention import Snapshot, parse_retention, to_prune  # noqa: E402

MiB = 1 << 20
POLICY = {"keep_last": 3, "keep_hourly": 24, "keep_daily": 14, "keep_weekly": 8, "keep_monthly": 12,
          "overrides": [{"device": "*", "dataset": "sql*", "keep_last": 288}]}
START = calendar.timegm(time.strptime("2026-11-01 00:00", "%Y-%m-%d %H:%M"))


class Dataset:
    """One dataset's snapshots as lists of chunk ids; a rewritten chunk gets a new id (new content)."""

    def __init__(self, name: str, chunks: int, change: float, rng: random.Random):
        self.name, self.rng = name, rng
        self.current = list(range(chunks))
        self.next_id = chunks
        self.per_snapshot = max(1, round(chunks * change))
        self.hot = list(range(max(1, chunks // 10)))
        self.snapshots: dict[str, tuple[float, list]] = {}  # name -> (taken_at, chunk ids)

    def take(self, taken_at: float) -> None:
        for _ in range(self.per_snapshot):
            index = self.rng.choice(self.hot) if self.rng.random() < 0.8 else self.rng.randrange(len(self.current))
            self.current[index] = self.next_id
            self.next_id += 1
        self.snapshots[f"s{int(taken_at)}"] = (taken_at, list(self.current))

    def prune(self, policy) -> int:
        doomed = to_prune([Snapshot(n, at) for n, (at, _) in self.snapshots.items()],
                          policy.rules_for("office-1", self.name))
        for name in doomed:
            del self.snapshots[name]
        return len(doomed)

    def referenced(self) -> set:
        return set().union(*(set(ids) for _, ids in self.snapshots.values()))


def simulate(days: int, every_min: int, datasets: int, chunks: int, change: float) -> list[dict]:
    policy = parse_retention(POLICY)
    rng = random.Random(2026)
    sets = [Dataset(name, chunks, change, rng) for name in (["sql1", "fs", "vm"] * datasets)[:datasets]]
    rows, now, step = [], START, every_min * 60
    taken = pruned = 0
    for day in range(1, days + 1):
        day_end = START + day * 86400
        while now < day_end:
            for ds in sets:
                ds.take(now)
                taken += 1
            now += step
            if (now - START) % 3600 == 0:  # the broker's prune_interval: hourly here
                pruned += sum(ds.prune(policy) for ds in sets)
        stored = sum(len(ds.referenced()) for ds in sets) * MiB
        everything = sum(ds.next_id for ds in sets) * MiB  # every chunk ever written, had nothing been pruned
        rows.append({"day": day, "taken": taken, "catalog_rows": sum(len(ds.snapshots) for ds in sets),
                     "pruned": pruned, "stored_bytes": stored, "unpruned_bytes": everything,
                     "rows_by_dataset": {ds.name: len(ds.snapshots) for ds in sets}})
    return rows


def gc_per_100k(chunks: int) -> dict:
    """The node's collector on a fresh synthetic store, timed; then on another, under tracemalloc."""
    work = Path(tempfile.mkdtemp(prefix="speedsync-lifecycle-"))
    try:
        live = build(work / "timed", chunks, 0.5, 4, 40, seed=7)
        figures = run_gc(work / "timed")
        build(work / "traced", chunks, 0.5, 4, 40, seed=7)
        tracemalloc.start()
        run_gc(work / "traced")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        scale = 100_000 / chunks
        return {"chunks": chunks, "live": live, "seconds_per_100k": figures["seconds"] * scale,
                "longest_slice_s": figures["longest_slice_s"], "loop_s_per_100k": figures["loop_s"] * scale,
                "peak_bytes_per_100k": peak * scale, "peak_bytes_per_live_chunk": peak / max(1, live)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--every-min", type=int, default=5)
    p.add_argument("--datasets", type=int, default=3)
    p.add_argument("--chunks", type=int, default=256, help="1 MiB chunks per image")
    p.add_argument("--change", type=float, default=0.02, help="fraction of chunks each snapshot rewrites")
    p.add_argument("--gc-chunks", type=int, default=100_000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify-cost", action="store_true", help="uploads timed beside background verification")
    p.add_argument("--verify-upload-mib", type=int, default=512)
    p.add_argument("--verify-stored-mib", type=int, default=512)
    p.add_argument("--verify-rounds", type=int, default=3)
    args = p.parse_args()
    from loguru import logger
    logger.remove()  # the collector's INFO lines would interleave with the table
    started = time.monotonic()
    month = simulate(args.days, args.every_min, args.datasets, args.chunks, args.change)
    simulated_s = time.monotonic() - started
    gc = gc_per_100k(args.gc_chunks) if args.gc_chunks else None
    cost = speed = None
    if args.verify_cost:
        speed = throughput(args.verify_stored_mib)
        cost = upload_cost(args.verify_upload_mib, args.verify_stored_mib, args.verify_rounds,
                           log=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"month": month, "gc": gc, "simulation_seconds": simulated_s, "verify_throughput": speed,
                          "verify_cost": cost}))
        return 0
    print(f"{args.datasets} datasets, a snapshot each every {args.every_min} min, {args.chunks} MiB images, "
          f"{args.change:.0%} rewritten per snapshot; policy {json.dumps(POLICY)}")
    print(f"{'day':>4} {'taken':>7} {'catalog rows':>12} {'rows/taken':>10} {'stored':>10} {'unpruned':>10} "
          f"{'stored/unpruned':>15}  rows by dataset")
    for r in month:
        print(f"{r['day']:>4} {r['taken']:>7} {r['catalog_rows']:>12} {r['catalog_rows'] / r['taken']:>10.3f} "
              f"{r['stored_bytes'] / 2**30:>8.1f}Gi {r['unpruned_bytes'] / 2**30:>8.1f}Gi "
              f"{r['stored_bytes'] / r['unpruned_bytes']:>15.3f}  {r['rows_by_dataset']}")
    print(f"(simulated in {simulated_s:.1f} s)")
    if gc:
        print(f"GC, the node's collector on {gc['chunks']:,} chunks ({gc['live']:,} referenced): "
              f"{gc['seconds_per_100k']:.2f} s per 100,000 chunks, longest slice {gc['longest_slice_s'] * 1000:.0f} ms, "
              f"loop {gc['loop_s_per_100k'] * 1000:.0f} ms per 100,000; peak heap "
              f"{gc['peak_bytes_per_100k'] / 1e6:.1f} MB per 100,000 ({gc['peak_bytes_per_live_chunk']:.0f} B per "
              "referenced chunk)")
    if cost:
        print_throughput(speed)
        print_cost(cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
