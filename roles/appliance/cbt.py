"""Changed-block tracking (DESIGN.md "Where snapshots come from").

An optional `<snapshot>.changes` beside an image lists the byte ranges
changed since the previous snapshot, one `offset length` pair per line. When
the previous snapshot is committed and its chunk names are known locally,
only chunks touching a changed range are read; the others keep their names
from the previous manifest. The whole-image blake3 is then computed by the
storage node from the chunks it verified (the agent did not read it all).

A sidecar is a claim, not a proof: one that under-reports would commit a
snapshot that is not the image. So before anything is sent, a sample of the
unchanged chunks (`cbt_sample_chunks`, or `cbt_sample_fraction` of them if
more; a choice seeded by the snapshot's key, so a rerun checks the same
ones) is read and hashed against the previous manifest. Any mismatch means
the sidecar lied: the warning names it and the whole image is read and
hashed instead. Every chunk sent is hashed from the bytes read, and a known
chunk the cloud lacks is read and checked too; a mismatch there fails the
upload and the snapshot's sidecar is not trusted again by this process.

Used only when it is safe: the previous committed snapshot must be the
image's immediate predecessor (no snapshot between them that the sidecar's
ranges would not cover) and have the same chunk size. Otherwise, or if the
sidecar is malformed, the whole image is hashed and the log says why.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import blake3
import msgpack

from roles.appliance.chunker import read_chunk
from roles.chunkdata import zeros

from roles.geometry import chunk_count_for

SUFFIX = ".changes"


class ChangesError(ValueError):
    pass


def parse_changes(path: str | os.PathLike, image_size: int) -> list[tuple[int, int]]:
    ranges = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ChangesError(f"{path}:{number}: expected 'offset length' in decimal")
            offset, length = int(parts[0]), int(parts[1])
            if offset + length > image_size:
                raise ChangesError(f"{path}:{number}: range {offset}+{length} runs past the image ({image_size})")
            ranges.append((offset, length))
    return ranges


def changed_chunks(ranges, chunk_size: int) -> set:
    touched = set()
    for offset, length in ranges:
        if length:
            touched.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return touched


class NamesStore:
    """Chunk names of committed snapshots, kept by the agent for CBT."""

    def __init__(self, state_dir: str):
        self.root = Path(state_dir) / "manifests"
        self.distrusted: set = set()  # (dataset, snapshot) whose sidecar was caught lying: read whole

    def distrust(self, dataset: str, snapshot: str) -> None:
        self.distrusted.add((dataset, snapshot))  # set.add is atomic: safe from a pool thread

    def _path(self, dataset: str, snapshot: str) -> Path:
        return self.root / dataset / f"{snapshot}.names"

    def save(self, dataset: str, snapshot: str, chunk_size: int, image_size: int, names: list) -> None:
        path = self._path(dataset, snapshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb({"chunk_size": chunk_size, "image_size": image_size, "names": names}))
        os.replace(tmp, path)  # a lost file only costs a full hash next time: no fsync needed

    def load(self, dataset: str, snapshot: str) -> dict | None:
        try:
            return msgpack.unpackb(self._path(dataset, snapshot).read_bytes())
        except (OSError, ValueError, msgpack.UnpackException):
            return None


def known_names(pending, previous: str | None, snapshots_between: bool, names: NamesStore) -> tuple[dict | None, str]:
    """({chunk index: name} for unchanged chunks, or None; and why)."""
    sidecar = Path(pending.path).with_suffix(SUFFIX)
    if not sidecar.exists():
        return None, "no .changes sidecar"
    if previous is None:
        return None, "no earlier snapshot is committed"
    if (pending.dataset.name, pending.snapshot) in names.distrusted:
        return None, f"{sidecar.name} under-reported a change before"
    if snapshots_between:
        return None, f"snapshots between {previous} and {pending.snapshot} were not replicated"
    prior = names.load(pending.dataset.name, previous)
    chunk_size = pending.dataset.chunk_size
    if prior is None or prior["chunk_size"] != chunk_size:
        return None, f"the chunk names of {previous} are not known here"
    try:
        touched = changed_chunks(parse_changes(sidecar, pending.size), chunk_size)
    except (OSError, ChangesError) as exc:
        return None, f"unusable sidecar: {exc}"
    count = chunk_count_for(pending.size, chunk_size)
    prior_names = prior["names"]
    # a chunk the previous image ended inside, or did not have, is read too
    last_full = prior["image_size"] // chunk_size
    known = {i: prior_names[i] for i in range(min(count, len(prior_names), last_full))
             if i not in touched and not (i == count - 1 and pending.size % chunk_size)}
    return known, f"{len(touched)} changed chunk(s) per {sidecar.name}"


def sample_of(known: dict | None, pending, chunks: int, fraction: float) -> dict:
    """{index: expected name} of the unchanged chunks to read and check (deterministic per snapshot)."""
    if not known:
        return {}
    count = min(len(known), max(chunks, math.ceil(fraction * len(known))))
    seed = blake3.blake3(f"{pending.dataset.name}/{pending.snapshot}".encode()).digest()
    chosen = random.Random(seed).sample(sorted(known), count)
    return {index: known[index] for index in sorted(chosen)}


def check_sample(path: str, sample: dict, chunk_size: int, image_size: int, pacer=None) -> list:
    """Indexes of `sample` whose bytes on disk do not have the expected name (None: all zero)."""
    lied = []
    for index, expected in sample.items():
        raw = read_chunk(path, index, chunk_size, image_size, pacer)
        name = None if raw == zeros(len(raw)) else blake3.blake3(raw).digest()
        if name != expected:
            lied.append(index)
    return lied
