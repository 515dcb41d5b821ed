"""Dedup timing bench: is STORED faster for content another device already stored?

    python bench/timing.py [--samples 100] [--chunk-size 1MiB] [--seed 1] [--workdir DIR] [--json]

Starts the real broker and one storage node (tests/harness.py's Cluster, plain
TCP, on free loopback ports). Device `holder` stores `samples` random chunks.
Device `prober` then offers one transfer of 2 x `samples` chunks, the holder's
and as many new to everyone, in a seeded random order, and sends them one at
a time: each CHUNK's latency is the time until its STORED comes back through
the broker. Prints the median, p90 and interquartile range of both groups,
the difference of the medians against the pooled interquartile range (the
mean of the two groups'), and a Mann-Whitney rank test (normal
approximation): |z| below 3.3 (two-sided p > 0.001) means ranks do not
separate the groups.

DESIGN.md forbids a device learning that another holds some content; the
node makes STORED of a chunk already on disk a real write of it
(roles/storenode/chunkstore.py), so the groups should overlap. Exit status
0 measured, 1 a protocol step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, REPO)

import blake3  # noqa: E402
import zmq  # noqa: E402

MiB = 1024 * 1024


@dataclass
class Summary:
    samples: int
    median_ms: float
    p90_ms: float
    iqr_ms: float


@dataclass
class Comparison:
    held: Summary  # content another device had stored
    new: Summary  # content new to everyone
    median_diff_ms: float  # held minus new
    # pooled as a variance is: the mean of the two groups' interquartile ranges, not the IQR of
    # the mixture (which a separation between the groups would inflate)
    pooled_iqr_ms: float
    rank_z: float  # Mann-Whitney U, normal approximation

    @property
    def overlap(self) -> bool:
        """The groups overlap: the medians are closer than the groups' spread (pooled IQR), and
        ranks do not separate them (|z| < 3.3, two-sided p > 0.001)."""
        return abs(self.median_diff_ms) < self.pooled_iqr_ms and abs(self.rank_z) < 3.3


def quantile(values, q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values) -> Summary:
    return Summary(len(values), statistics.median(values) * 1000, quantile(values, 0.9) * 1000,
                   (quantile(values, 0.75) - quantile(values, 0.25)) * 1000)


def rank_z(a, b) -> float:
    """Mann-Whitney U of a against b as a z score (ties share their mean rank)."""
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    n1, n2 = len(a), len(b)
    r1 = sum(r for r, (_, group) in zip(ranks, pooled) if group == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    sigma = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return (u1 - n1 * n2 / 2) / sigma


def compare(held, new) -> Comparison:
    h, n = summary(held), summary(new)
    return Comparison(h, n, h.median_ms - n.median_ms, (h.iqr_ms + n.iqr_ms) / 2, rank_z(held, new))


class Uploader:
    """One device's raw DEALER: offers one transfer and sends chunks one at a time under credit."""

    def __init__(self, ctx, frontend: str, device_id: str, timeout_s: float = 30):
        from tests.harness import RawClient
        self.client = RawClient(ctx, frontend)
        self.client.hello(device_id)
        self.timeout_s = timeout_s
        self.credit = 0

    def open(self, dataset: str, snapshot: str, chunks: list[bytes], chunk_size: int) -> list[bytes]:
        names = [blake3.blake3(c).digest() for c in chunks]
        self.client.send("OFFER", req=1, dataset=dataset, snapshot=snapshot, image_size=len(chunks) * chunk_size,
                         chunk_size=chunk_size, chunk_count=len(chunks))
        self.tid = self.client.expect("ACCEPT", self.timeout_s)["transfer_id"]
        self.client.send("QUERY", transfer_id=self.tid, start=0, hashes=names)
        missing = self._until("MISSING")
        if missing["missing"] != list(range(len(chunks))):
            raise RuntimeError(f"expected every chunk missing, got {missing['missing'][:10]}...")
        return names

    def _until(self, t: str):
        while True:
            msg = self.client.receive(self.timeout_s)
            if msg is None:
                raise RuntimeError(f"no {t} within {self.timeout_s}s")
            if msg.t == "CREDIT":
                self.credit += msg["bytes"]
                if t == "CREDIT":
                    return msg
            elif msg.t == t:
                return msg
            elif msg.t == "ERROR":
                raise RuntimeError(f"ERROR {msg['code']}: {msg['reason']}")

    def store(self, name: bytes, chunk: bytes) -> float:
        """Send one chunk; seconds from its send to its STORED."""
        while self.credit < len(chunk):
            self._until("CREDIT")
        self.credit -= len(chunk)
        start = time.perf_counter()
        self.client.send("CHUNK", payload=[chunk], transfer_id=self.tid, hash=name, raw_len=len(chunk), codec="raw")
        stored = self._until("STORED")
        elapsed = time.perf_counter() - start
        if stored["hash"] != name:
            raise RuntimeError("STORED for another chunk than the one in flight")
        return elapsed

    def commit(self) -> None:
        self.client.send("COMMIT", transfer_id=self.tid, image_blake3=None)
        self._until("COMMITTED")

    def close(self) -> None:
        self.client.close()


def measure(ctx, frontend: str, samples: int, chunk_size: int = MiB, seed: int = 1) -> tuple[list, list]:
    """(held latencies, new latencies) in seconds, against a running broker and node."""
    rng = random.Random(seed)
    held = [rng.randbytes(chunk_size) for _ in range(samples)]
    new = [rng.randbytes(chunk_size) for _ in range(samples)]
    holder = Uploader(ctx, frontend, "holder")
    try:
        names = holder.open("held", "s1", held, chunk_size)
        for name, chunk in zip(names, held):
            holder.store(name, chunk)
        holder.commit()
    finally:
        holder.close()
    order = [("held", c) for c in held] + [("new", c) for c in new]
    rng.shuffle(order)
    prober = Uploader(ctx, frontend, "prober")
    latencies: dict[str, list] = {"held": [], "new": []}
    try:
        names = prober.open("probe", "s1", [c for _, c in order], chunk_size)
        for (group, chunk), name in zip(order, names):
            latencies[group].append(prober.store(name, chunk))
        prober.commit()
    finally:
        prober.close()
    return latencies["held"], latencies["new"]


def main(argv=None) -> int:
    from roles.units import parse_size
    from tests.harness import Cluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100, help="chunks per group (default 100)")
    parser.add_argument("--chunk-size", default="1MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="where the cluster's data goes (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    chunk_size = parse_size(args.chunk_size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        cluster = Cluster(Path(work))
        ctx = zmq.Context()
        try:
            cluster.start()
            held, new = measure(ctx, cluster.frontend, args.samples, chunk_size, args.seed)
        except RuntimeError as exc:
            print(f"timing: {exc}", file=sys.stderr)
            return 1
        finally:
            ctx.destroy(linger=0)
            cluster.stop()
    result = compare(held, new)
    if args.json:
        print(json.dumps({**asdict(result), "overlap": result.overlap}, indent=2))
    else:
        for label, s in (("held by another device", result.held), ("new to all", result.new)):
            print(f"{label:24} n={s.samples:4}  median {s.median_ms:7.2f} ms  p90 {s.p90_ms:7.2f} ms  "
                  f"IQR {s.iqr_ms:6.2f} ms")
        print(f"median difference {result.median_diff_ms:+.2f} ms; pooled IQR {result.pooled_iqr_ms:.2f} ms; "
              f"rank z {result.rank_z:+.2f}; overlap: {'yes' if result.overlap else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
