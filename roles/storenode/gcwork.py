"""Garbage collection's disk work: each function is one slice, run on a store thread.

The loop (gc.py) hands out one slice at a time. The referenced set and a
device's set are filled here and read by the loop only between slices, so no
two threads touch them at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack

from roles.storenode.manifests import Manifest

MARK_SLICE = 64  # manifest files read per slice
SWEEP_SLICE = 64  # chunk files deleted per slice
NAME_HEX = 64


class ManifestUnreadable(Exception):
    """A manifest that exists but cannot be read: what it references is unknown, so nothing is swept."""


def after_hook(hook, fn, *args):
    hook()
    return fn(*args)


def list_devices(manifests_root: Path, owners_root: Path) -> list[str]:
    """Every device with a manifest directory or an ownership log, sorted."""
    devices = {entry.name for entry in os.scandir(manifests_root) if entry.is_dir()}
    devices.update(entry.name[:-4] for entry in os.scandir(owners_root)
                   if entry.name.endswith(".log") and not entry.name.startswith("."))
    return sorted(devices)


def list_manifests(manifests_root: Path, device: str) -> list[Path]:
    base = manifests_root / device
    if not base.is_dir():
        return []
    return sorted(base.glob("*/*.manifest"))


def mark(paths: list[Path], referenced: set, device_names: set) -> None:
    """Add every chunk name these manifests reference to both sets. A manifest removed meanwhile
    references nothing any more; one unreadable or undecodable raises ManifestUnreadable."""
    for path in paths:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ManifestUnreadable(f"{path}: {exc.strerror or exc}") from None
        try:
            chunks = Manifest.from_bytes(blob).chunks
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            raise ManifestUnreadable(f"{path}: undecodable") from None
        for name in chunks:
            if name is not None and name not in device_names:
                device_names.add(name)
                referenced.add(name)


def sweep(directory: Path, referenced: set, pins, limit: int = SWEEP_SLICE) -> tuple[int, int, bool]:
    """Delete up to `limit` chunk files of one `chunks/<hh>/` directory that no manifest references
    and no open upload holds; returns (deleted, bytes freed, whether the directory is done).
    Copies and temporaries are not chunks. The directory is not fsync'd: an unlink a power cut
    undoes leaves a file nothing references, which the next run deletes again."""
    deleted = freed = 0
    for entry in os.scandir(directory):
        if deleted >= limit:
            return deleted, freed, False
        if len(entry.name) != NAME_HEX or entry.name.startswith("."):
            continue
        try:
            name = bytes.fromhex(entry.name)
        except ValueError:
            continue
        if name in referenced:
            continue
        with pins.lock:  # the check and the unlink as one step against a pin (gcpins.py)
            if pins.protected(name):
                continue
            try:
                size = entry.stat().st_size
                os.unlink(entry.path)
            except FileNotFoundError:  # quarantined by a scrub meanwhile
                continue
        deleted += 1
        freed += size
    return deleted, freed, True
