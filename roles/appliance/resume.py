"""What a new upload may take from earlier ones: interrupted uploads resume
(from what the cloud holds), and changed-block tracking skips reading chunks
a `.changes` sidecar says did not change (roles/appliance/cbt.py)."""

from __future__ import annotations

import os

from loguru import logger

from roles.appliance import cbt
from roles.appliance.scanner import scan_ids


def interrupted_uploads(journal) -> set:
    """Keys of uploads a previous run started and did not finish, whose file is still there."""
    resuming = set()
    for dataset, snapshot, path in journal.interrupted():
        if os.path.exists(path):
            resuming.add((dataset, snapshot))
            logger.info("{}/{} was interrupted; it resumes from what the cloud holds", dataset, snapshot)
        else:
            logger.warning("{}/{} was interrupted but {} has vanished; forgetting it", dataset, snapshot, path)
            journal.forget_started(dataset, snapshot)
    return resuming


def unchanged_chunks(pending, journal, names: cbt.NamesStore) -> dict | None:
    """Changed-block tracking: names of chunks the .changes sidecar says did not change."""
    if not os.path.exists(os.path.splitext(pending.path)[0] + cbt.SUFFIX):
        return None
    name = pending.dataset.name
    previous = journal.previous_committed(name, pending.snapshot)
    between = previous is not None and any(
        previous < other < pending.snapshot
        for other in scan_ids(pending.dataset) | journal.settled_snapshots(name))
    known, why = cbt.known_names(pending, previous, between, names)
    if known is None:
        logger.info("{}/{}: reading the whole image ({})", name, pending.snapshot, why)
    else:
        logger.info("{}/{}: reading only changed chunks ({})", name, pending.snapshot, why)
    return known
