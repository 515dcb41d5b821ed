"""Find snapshots waiting to go off-site (DESIGN.md "Where snapshots come from").

Every `<snapshot>.img` in a dataset's directory is one complete, immutable
snapshot; ids sort in time order. Files whose stem is not a valid id are
ignored (and logged once), never turned into paths on the cloud side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from roles.config import DatasetConfig
from schemas import is_valid_id

SUFFIX = ".img"


@dataclass(frozen=True)
class PendingSnapshot:
    dataset: DatasetConfig
    snapshot: str
    path: str
    size: int
    taken_at: int | None = None  # the image file's mtime, whole seconds: the time retention works on

    @property
    def key(self) -> tuple:
        return (self.dataset.name, self.snapshot)

    def order(self) -> tuple:
        return (self.dataset.priority, self.snapshot, self.dataset.name)


_warned: set = set()


def scan_dataset(dataset: DatasetConfig, committed: set) -> list[PendingSnapshot]:
    directory = Path(dataset.path)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        if dataset.path not in _warned:
            _warned.add(dataset.path)
            logger.warning("dataset {}: directory {} does not exist", dataset.name, dataset.path)
        return []
    found = []
    for entry in entries:
        if not entry.name.endswith(SUFFIX) or not entry.is_file():
            continue
        snapshot = entry.name[: -len(SUFFIX)]
        if not is_valid_id(snapshot):
            if entry.path not in _warned:
                _warned.add(entry.path)
                logger.warning("ignoring {}: not a valid snapshot id", entry.path)
            continue
        if snapshot in committed:
            continue
        stat = entry.stat()
        found.append(PendingSnapshot(dataset, snapshot, entry.path, stat.st_size, max(0, int(stat.st_mtime))))
    return sorted(found, key=lambda p: p.snapshot)


def scan(datasets, journal) -> list[PendingSnapshot]:
    """Every pending snapshot, most urgent first (priority, then oldest)."""
    pending = []
    for dataset in datasets:
        pending.extend(scan_dataset(dataset, journal.settled_snapshots(dataset.name)))
    return sorted(pending, key=PendingSnapshot.order)


def scan_ids(dataset: DatasetConfig) -> set:
    """Every snapshot id present in a dataset's directory, committed or not."""
    try:
        return {e.name[: -len(SUFFIX)] for e in os.scandir(dataset.path)
                if e.name.endswith(SUFFIX) and is_valid_id(e.name[: -len(SUFFIX)])}
    except FileNotFoundError:
        return set()
