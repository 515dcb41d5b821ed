"""The newest commit of each dataset, in wall-clock seconds (DESIGN.md
"Fleet operations — contract", Metrics: alert on `time() - x > RPO`).

One entry per (device, dataset) that has a committed snapshot: the catalog's
datasets, no more (pruning keeps each dataset's newest snapshot, so an entry
never goes away). The time is the catalog row's `committed_at`, which the
catalog thread stamps; the core never reads a clock. At start it is seeded
from the catalog index (`CatalogIndex.newest_commit`, which the driver loads
before the loop runs).

Publishing costs what changed, not what exists: the dict is kept in order of
last update (an updated key moves to the end) and `updates` counts the
updates. Each update moves one key to the end, so a reader that has seen `n`
updates finds every key changed since among the last `updates - n` entries.
"""

from __future__ import annotations

from itertools import islice


class LastCommits:
    def __init__(self):
        self.at: dict[tuple[str, str], float] = {}  # (device, dataset) -> wall-clock seconds
        self.updates = 0

    def record(self, device_id: str, dataset: str, committed_at: float) -> bool:
        """A commit at `committed_at`; False (nothing changes) if an entry is as new or newer."""
        key = (device_id, dataset)
        old = self.at.get(key)
        if old is not None and old >= committed_at:
            return False
        if old is not None:
            del self.at[key]  # re-inserted at the end: the newest update is last
        self.at[key] = committed_at
        self.updates += 1
        return True

    def merge(self, rows) -> None:
        """(device, dataset, committed_at) rows, such as the catalog's newest per dataset."""
        for device_id, dataset, committed_at in rows:
            self.record(device_id, dataset, committed_at)

    def changed_since(self, seen: int) -> list[tuple[tuple[str, str], float]]:
        """((device, dataset), committed_at) of every entry updated after the
        reader's `seen`-th update (possibly a few more): O(updates since)."""
        count = self.updates - seen
        if count <= 0:
            return []
        if count >= len(self.at):
            return list(self.at.items())
        return list(islice(reversed(self.at.items()), count))

    def __len__(self) -> int:
        return len(self.at)
