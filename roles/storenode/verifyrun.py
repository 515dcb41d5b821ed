"""Re-verifying one committed snapshot, a slice at a time, on a store thread.

A `VerifyRun` is one snapshot's check: its manifest is loaded, then every
chunk file is read, decoded and re-hashed against its name, and the raw
bytes (zeros for an all-zero chunk) feed the whole-image blake3, which must
equal the manifest's. `step` does at most a budget of reading (and hashing)
and returns; the background verifier (background.py) calls it again later,
so a huge image never holds a thread for long and the read rate is the
caller's to pace. Only one slice of a run is ever in flight: the run object
is handed to the pool and back, never touched by two threads at once.

A chunk that fails (unreadable, wrong name, wrong length) is moved to
`<data_dir>/quarantine/` as scrub does (scrub.py): absent to the store, so
the next upload of that content stores it afresh. A chunk file that is
simply gone counts as damaged too, unless the manifest itself is gone
(pruned, garbage-collected meanwhile): then the run ends quietly.

`next_key` walks the manifest tree in key order from a cursor (the
background order survives a restart as that one key: `save_state`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import msgpack

from bus.errors import RequestError
from roles.chunkdata import decode_and_verify, feed_zeros, parse_chunk_file
from roles.durable import fsync_dir, make_dirs, write_durable
from schemas import is_valid_id

MANIFEST_SUFFIX = ".manifest"
STATE_FILE = "verify.state"


@dataclass(frozen=True)
class Outcome:
    """How one snapshot's check ended. `gone`: the manifest is no longer stored (nothing to say)."""
    key: tuple  # (device_id, dataset, snapshot)
    ok: bool  # every chunk whole and the image blake3 the manifest's
    reason: str = ""
    damaged: tuple = ()  # hex names of the chunks quarantined or missing
    image_blake3: bytes | None = None  # the manifest's
    gone: bool = False


@dataclass
class VerifyRun:
    key: tuple
    expected: bytes | None = None  # a device's request: the local image's blake3
    request_id: str | None = None
    manifest: object = None
    index: int = 0
    hasher: object = field(default_factory=blake3.blake3)
    damaged: list = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


def quarantine(data_dir: Path, path: Path) -> None:
    """Move a damaged chunk file out of the store, durably (scrub's layout)."""
    target_dir = data_dir / "quarantine"
    make_dirs(target_dir)
    try:
        os.replace(path, target_dir / path.name)
    except FileNotFoundError:
        return
    fsync_dir(target_dir)
    fsync_dir(path.parent)


def _check_chunk(path: Path, name: bytes, expected_len: int) -> tuple[bytes | None, str, int]:
    """(raw bytes or None, the reason if damaged, bytes read)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None, "missing", 0
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", 0
    try:
        codec, raw_len, payload = parse_chunk_file(blob)
        raw = decode_and_verify(codec, payload, raw_len, name)
    except ValueError as exc:
        return None, str(exc), len(blob)
    except RequestError as exc:
        return None, exc.reason, len(blob)
    if len(raw) != expected_len:
        return None, f"{len(raw)} bytes, the manifest expects {expected_len}", len(blob)
    return raw, "", len(blob)


def step(run: VerifyRun, chunks, manifests, data_dir: Path, read_budget: int, hash_budget: int) -> int:
    """Advance `run` by about `read_budget` bytes read (and `hash_budget` hashed); returns bytes read.
    On a store thread. Sets `run.outcome` when the snapshot is done."""
    if run.manifest is None:
        try:
            run.manifest = manifests.load(*run.key)
        except RequestError as exc:
            if exc.code == "not_found":
                run.outcome = Outcome(run.key, False, "not stored here", gone=True)
            else:
                run.outcome = Outcome(run.key, False, exc.reason)
            return 0
    manifest = run.manifest
    read = hashed = 0
    while run.index < manifest.chunk_count and read < read_budget and hashed < hash_budget:
        index, name = run.index, manifest.chunks[run.index]
        length = manifest.chunk_len(index)
        run.index += 1
        hashed += length
        if name is None:
            if not run.damaged:
                feed_zeros(run.hasher, length)
            continue
        path = chunks.path_for(name)
        raw, reason, nbytes = _check_chunk(path, name, length)
        read += nbytes
        if raw is None:
            if reason == "missing" and not manifests.exists(*run.key):
                run.outcome = Outcome(run.key, False, "not stored here", gone=True)
                return read
            if reason != "missing":
                quarantine(data_dir, path)
            if name.hex() not in run.damaged:
                run.damaged.append(name.hex())
            continue
        if not run.damaged:  # once a chunk is bad the image cannot match: only name the rest
            run.hasher.update(raw)
    if run.index >= manifest.chunk_count:
        run.outcome = _conclude(run)
    return read


def _conclude(run: VerifyRun) -> Outcome:
    manifest = run.manifest
    if run.damaged:
        return Outcome(run.key, False, f"{len(run.damaged)} chunks damaged (quarantined)", tuple(run.damaged),
                       manifest.image_blake3)
    if run.hasher.digest() != manifest.image_blake3:
        return Outcome(run.key, False, "the chunks do not rebuild the manifest's image blake3", (),
                       manifest.image_blake3)
    return Outcome(run.key, True, "", (), manifest.image_blake3)


def next_key(root: Path, after: tuple | None) -> tuple | None:
    """The first (device, dataset, snapshot) of the manifest tree after `after` (None: from the start)."""
    after = after or ()
    for device in _sorted_dirs(root):
        if (device,) < after[:1]:
            continue
        for dataset in _sorted_dirs(root / device):
            if (device, dataset) < after[:2]:
                continue
            try:
                names = os.listdir(root / device / dataset)
            except FileNotFoundError:
                continue
            for snapshot in sorted(n[:-len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX)):
                key = (device, dataset, snapshot)
                if key > after and is_valid_id(snapshot):
                    return key
    return None


def _sorted_dirs(path: Path) -> list:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and is_valid_id(e.name))
    except FileNotFoundError:
        return []


def save_state(data_dir: Path, cursor: tuple | None, damaged: list) -> None:
    """The background order's cursor and the damage known, durably (on a store thread)."""
    blob = msgpack.packb({"format": 1, "cursor": list(cursor) if cursor else None,
                          "damaged": [[*key, list(names), reason] for key, names, reason in damaged]})
    write_durable(data_dir / STATE_FILE, [blob])


def load_state(data_dir: Path) -> tuple[tuple | None, list]:
    """(cursor, [(key, names, reason)]) as saved; a missing or unreadable file starts afresh."""
    try:
        d = msgpack.unpackb((data_dir / STATE_FILE).read_bytes(), raw=False)
        cursor = tuple(d["cursor"]) if d.get("cursor") else None
        damaged = [(tuple(e[:3]), tuple(e[3]), str(e[4])) for e in d.get("damaged", ())]
        if cursor is not None and (len(cursor) != 3 or not all(is_valid_id(v) for v in cursor)):
            cursor = None
        return cursor, [e for e in damaged if all(is_valid_id(v) for v in e[0])]
    except (OSError, ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException):
        return None, []
