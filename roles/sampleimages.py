"""Deterministic generator of realistic disk-image files for tests and benches.

A real disk image is not uniform: large runs are all-zero (unallocated
blocks), much is compressible (logs, text, database pages), and the rest is
already compressed or encrypted (media, archives) and therefore random to a
compressor.  `generate_image` lays such extents out, aligned to `extent`
bytes and of varying lengths (1, 2, 4 or 8 extents), in exactly the requested
proportions, all chosen by a seeded RNG: the same arguments always give the
same bytes.

Speed matters (1 GiB in a few seconds), so bytes are never produced one by
one in Python:

- random extents come from the blake3 extendable output keyed by the seed and
  the extent's position (gigabytes per second, incompressible, unique);
- compressible extents are assembled from a seeded pool of 16 KiB text and
  record segments, each piece rotated at a random offset and passed through a
  random digit permutation (`bytes.translate`), so no two pieces are alike yet
  each keeps the statistics of the pool (zstd level 1 gives about 3-5x).

Files appear by rename (`path + ".part"` then `os.rename`), as DESIGN.md
requires of snapshot writers.

Standard library plus blake3 only.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys

import blake3

MiB = 1 << 20
PIECE = 16 * 1024          # compressible extents are built from pieces this big
POOL_PIECES = 256          # distinct segments in the compressible pool
RUN_LENGTHS = (1, 1, 1, 2, 2, 4, 8)   # extent multiples; short runs are likelier
MUTATION = 4096            # bytes rewritten inside each mutated chunk

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10,
          "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30,
          "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456; '1GB' -> 10**9; '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 64KiB, 256MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def file_blake3(path: str) -> str:
    """Hex blake3 of a file's bytes."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- byte sources

def _random_bytes(seed: int, tag: str, index: int, length: int) -> bytes:
    """Incompressible bytes, a pure function of (seed, tag, index, length)."""
    return blake3.blake3(f"speedsync-imagegen/{seed}/{tag}/{index}".encode()).digest(length=length)


_WORDS = ("error warning info debug request response session user admin backup "
          "snapshot volume disk block sector file folder share printer network "
          "client server connect disconnect timeout retry success failure open "
          "close read write delete rename commit rollback transaction invoice "
          "customer order payment account report monthly weekly daily schedule "
          "service started stopped restarted queue worker thread process memory "
          "cpu usage latency bytes packets accepted rejected policy firewall vpn "
          "mail sent received spam quarantine update patch install reboot").split()
_HOSTS = [f"srv-{name}" for name in ("dc01", "files", "sql", "mail", "web", "print", "app2")]
_SERVICES = ("sshd", "smbd", "postgres", "nginx", "cron", "kernel", "backupd", "postfix")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def _log_segment(rng: random.Random, size: int) -> bytes:
    """Syslog-like lines: timestamps, hosts, services, prose, small numbers."""
    lines, total = [], 0
    t = rng.randrange(1_600_000_000, 1_700_000_000)
    while total < size:
        t += rng.randrange(0, 5)
        hh, mm, ss = (t // 3600) % 24, (t // 60) % 60, t % 60
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 12)))
        line = (f"2024-{(t // 2592000) % 12 + 1:02d}-{(t // 86400) % 28 + 1:02d}T"
                f"{hh:02d}:{mm:02d}:{ss:02d}.{rng.randrange(1000):03d}Z "
                f"{rng.choice(_HOSTS)} {rng.choice(_SERVICES)}[{rng.randrange(100, 40000)}]: "
                f"{rng.choice(_LEVELS)} {words} id={rng.randrange(10**6)} "
                f"from 10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)} "
                f"in {rng.randrange(1, 5000)}ms\n")
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def _record_segment(rng: random.Random, size: int) -> bytes:
    """Database-page-like data: 8 KiB pages of fixed-width records plus slack."""
    pages, total = [], 0
    while total < size:
        page_no = rng.randrange(1 << 20)
        rows = []
        for _ in range(rng.randrange(40, 80)):
            name = rng.choice(_WORDS).ljust(16)
            rows.append(f"{rng.randrange(10**7):08d}|{name}|{rng.randrange(10**5):06d}."
                        f"{rng.randrange(100):02d}|{rng.choice(_HOSTS):<10}|"
                        f"{rng.randrange(2)}\n")
        body = f"PAGE {page_no:08d} LSN {rng.randrange(1 << 32):010d}\n".encode() + "".join(rows).encode()
        page = body[:8192].ljust(8192, b"\0")
        pages.append(page)
        total += len(page)
    return b"".join(pages)[:size]


class _CompressiblePool:
    """Seeded pool of segments and byte permutations; `extent(i)` is cheap."""

    def __init__(self, seed: int):
        rng = random.Random(f"pool/{seed}")
        self.segments = [(_log_segment if i % 3 else _record_segment)(rng, PIECE)
                         for i in range(POOL_PIECES)]
        digits = list(b"0123456789")
        self.tables = []
        for _ in range(64):
            perm = digits[:]
            rng.shuffle(perm)
            self.tables.append(bytes.maketrans(bytes(digits), bytes(perm)))
        self.seed = seed

    def extent(self, index: int, length: int) -> bytes:
        rng = random.Random(f"text/{self.seed}/{index}")
        pieces, total = [], 0
        while total < length:
            seg = self.segments[rng.randrange(POOL_PIECES)]
            cut = rng.randrange(PIECE)
            pieces.append((seg[cut:] + seg[:cut]).translate(self.tables[rng.randrange(64)]))
            total += PIECE
        return b"".join(pieces)[:length]


# ---------------------------------------------------------------- layout

def _layout(size_bytes: int, extent: int, zero_fraction: float, text_fraction: float,
            rng: random.Random) -> list[tuple[str, int]]:
    """Runs of (kind, extent count) with exact proportions, in seeded order."""
    if not (0 <= zero_fraction and 0 <= text_fraction and zero_fraction + text_fraction <= 1):
        raise ValueError("zero_fraction and text_fraction must be >= 0 and sum to <= 1")
    units = -(-size_bytes // extent)
    n_zero = round(units * zero_fraction)
    n_text = min(units - n_zero, round(units * text_fraction))
    runs = []
    for kind, count in (("zero", n_zero), ("text", n_text), ("random", units - n_zero - n_text)):
        while count > 0:
            n = min(count, rng.choice(RUN_LENGTHS))
            runs.append((kind, n))
            count -= n
    rng.shuffle(runs)
    return runs


def _write_atomically(path: str, blocks) -> str:
    """Write an iterable of byte blocks to path via path.part; hex blake3."""
    part = path + ".part"
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        with open(part, "wb") as f:
            for block in blocks:
                h.update(block)
                f.write(block)
        os.rename(part, path)
    except BaseException:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
    return h.hexdigest()


def generate_image(path: str, size_bytes: int, seed: int, zero_fraction: float = 0.3,
                   text_fraction: float = 0.4, extent: int = MiB) -> str:
    """Write a realistic image of exactly size_bytes to path; return its hex blake3.

    Extents are all-zero, compressible or random in the given proportions
    (the remainder, 1 - zero - text, is random), placed by a seeded RNG.
    """
    if size_bytes < 0 or extent <= 0:
        raise ValueError("size_bytes must be >= 0 and extent > 0")
    rng = random.Random(f"layout/{seed}")
    runs = _layout(size_bytes, extent, zero_fraction, text_fraction, rng)
    pool = _CompressiblePool(seed) if text_fraction > 0 else None
    zero = bytes(extent)

    def blocks():
        left, index = size_bytes, 0
        for kind, count in runs:
            for _ in range(count):
                if left <= 0:
                    return
                n = min(extent, left)
                if kind == "zero":
                    yield zero[:n] if n < extent else zero
                elif kind == "text":
                    yield pool.extent(index, n)
                else:
                    yield _random_bytes(seed, "random", index, n)
                left -= n
                index += 1

    return _write_atomically(path, blocks())


def half_zero_image(path: str, size_bytes: int, seed: int, chunk_size: int = MiB) -> str:
    """Even-numbered chunks all-zero, odd-numbered ones random; hex blake3."""
    zero = bytes(chunk_size)

    def blocks():
        for index, offset in enumerate(range(0, size_bytes, chunk_size)):
            n = min(chunk_size, size_bytes - offset)
            yield zero[:n] if index % 2 == 0 else _random_bytes(seed, "half", index, n)

    return _write_atomically(path, blocks())


def mutate_chunks(src: str, dst: str, chunk_indexes, chunk_size: int = MiB, seed: int = 0,
                  changes_path: str | None = None) -> str:
    """Copy src to dst, changing each listed chunk and no other; hex blake3 of dst.

    In each chunk, MUTATION bytes at a seeded random offset are replaced by
    random bytes (the whole chunk if it is shorter).  With changes_path, the
    rewritten ranges are also written there in DESIGN.md's `.changes` sidecar
    format (`offset length` per line), before dst appears.
    """
    size = os.path.getsize(src)
    chunks = -(-size // chunk_size)
    indexes = sorted(set(chunk_indexes))
    for i in indexes:
        if not 0 <= i < chunks:
            raise ValueError(f"chunk index {i} out of range 0..{chunks - 1}")
    rng = random.Random(f"mutate/{seed}")
    ranges = []
    for i in indexes:
        start = i * chunk_size
        length = min(chunk_size, size - start)
        n = min(MUTATION, length)
        ranges.append((start + rng.randrange(length - n + 1), n))
    if changes_path is not None:
        _write_atomically(changes_path, ["".join(f"{off} {n}\n" for off, n in ranges).encode()])
    part = dst + ".part"
    try:
        shutil.copyfile(src, part)
        with open(part, "r+b") as f:
            for offset, n in ranges:
                f.seek(offset)
                old = f.read(n)
                new = _random_bytes(seed, "mutate", offset, n)
                if new == old:      # astronomically unlikely; keep the promise anyway
                    new = bytes(b ^ 0xFF for b in new)
                f.seek(offset)
                f.write(new)
        os.rename(part, dst)
    except BaseException:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
    return file_blake3(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a deterministic, realistic disk image.")
    p.add_argument("out", help="output file (written as OUT.part, then renamed)")
    p.add_argument("--size", default="256MiB", type=parse_size, help="e.g. 256MiB, 1GiB (default 256MiB)")
    p.add_argument("--seed", default=1, type=int)
    p.add_argument("--zero-fraction", default=0.3, type=float)
    p.add_argument("--text-fraction", default=0.4, type=float)
    p.add_argument("--extent", default=MiB, type=parse_size, help="extent alignment (default 1MiB)")
    p.add_argument("--half-zero", action="store_true", help="alternate all-zero and random chunks")
    p.add_argument("--mutate-from", metavar="SRC",
                   help="instead of generating, copy SRC to OUT changing --chunks")
    p.add_argument("--chunks", default="", help="comma-separated chunk indexes for --mutate-from")
    p.add_argument("--changes", metavar="FILE", help="with --mutate-from: also write the .changes sidecar")
    args = p.parse_args(argv)
    if args.mutate_from:
        indexes = [int(x) for x in args.chunks.split(",") if x.strip()]
        digest = mutate_chunks(args.mutate_from, args.out, indexes, args.extent, args.seed,
                               args.changes)
    elif args.half_zero:
        digest = half_zero_image(args.out, args.size, args.seed, args.extent)
    else:
        digest = generate_image(args.out, args.size, args.seed, args.zero_fraction,
                                args.text_fraction, args.extent)
    print(f"{digest}  {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
