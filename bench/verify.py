"""Background verification throughput, by hand: `python -m bench.verify [--mib 256]`.

Builds a chunk store of random 1 MiB chunks (zstd level 1, as agents send
them) in a temporary directory, then re-verifies it with the node's own
slices (roles/storenode/background.py, unthrottled) and prints the rate
against two baselines measured in the same run on the same files: reading
them only, and reading + decompressing + blake3 (what verification cannot
avoid). The page cache is warm for all three (the files were just written),
so these are CPU figures; a cold disk is slower and the read limit is what
bounds it in production.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import blake3
import zstandard

from roles.chunkdata import decode_payload, parse_chunk_file
from roles.storenode.background import Verifier
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.manifests import Manifest, ManifestStore

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.mib)
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
        image = args.mib * MiB
        print(f"image {args.mib} MiB, {slices} slices")
        print(f"read only:            {image / read_s / 1e6:8.0f} MB/s (image bytes)")
        print(f"read+decode+blake3:   {image / hash_s / 1e6:8.0f} MB/s")
        print(f"background verify:    {image / verify_s / 1e6:8.0f} MB/s  "
              f"= {hash_s / verify_s:.2f} x read+decode+blake3, {read_s / verify_s:.2f} x read only")


if __name__ == "__main__":
    main()
