"""Timers in O(log n) per schedule and O(due) per wake-up.

A heap of (due, seq, key) with at most one live entry per key: scheduling a
key again, or cancelling it, leaves the old heap entry behind as stale, and
`pop_due` skips it. So a wake-up costs what is due, never a walk over every
peer. Owners keep their timers lazy: a message heard only updates a
timestamp; when the deadline pops, the owner re-checks the timestamp and
schedules the next one (a peer heard from costs nothing on the heap).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable


class Deadlines:
    def __init__(self):
        self._heap: list = []
        self._live: dict = {}  # key -> (due, seq) of its one live entry
        self._seq = itertools.count()

    def schedule(self, key: Hashable, due: float) -> None:
        """Set `key` to fire at `due`, replacing any earlier schedule of it."""
        live = self._live.get(key)
        if live is not None and live[0] == due:
            return
        seq = next(self._seq)
        self._live[key] = (due, seq)
        heapq.heappush(self._heap, (due, seq, key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def due_at(self, key: Hashable) -> float | None:
        live = self._live.get(key)
        return None if live is None else live[0]

    def pop_due(self, now: float) -> list:
        """Keys whose time has come, earliest first; each fires once."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, seq, key = heapq.heappop(heap)
            if self._live.get(key) == (due, seq):
                del self._live[key]
                out.append(key)
        return out

    def next_due(self) -> float | None:
        heap = self._heap
        while heap:
            due, seq, key = heap[0]
            if self._live.get(key) == (due, seq):
                return due
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        self._heap = [(due, seq, key) for key, (due, seq) in self._live.items()]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live
