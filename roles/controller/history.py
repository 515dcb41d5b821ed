"""Transfers that ended, for status: bounded, with one append path.

`finished` keeps the last N ended transfers (and an index by id, so that
late restore credit is recognised); `parked` holds, per snapshot, the offer
waiting for its node until the device offers it again, at most
`parked_per_device` per device (its oldest gives way) and for `parked_ttl`
seconds (expired oldest first by `expire(now)`: O(expired)).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from roles.controller.transfers import Transfer, parked_entry, resumed


class History:
    def __init__(self, keep: int, parked_per_device: int = 100, parked_ttl: float = 86400.0):
        self.finished: deque = deque(maxlen=keep)
        self.finished_by_id: dict[str, Transfer] = {}
        self.parked: OrderedDict = OrderedDict()  # (device, dataset, snapshot) -> parked offer, oldest first
        self.parked_at: dict[tuple, float] = {}
        self.parked_by_device: dict[str, OrderedDict] = {}  # device -> {key: None}, oldest first
        self.parked_per_device = parked_per_device
        self.parked_ttl = parked_ttl

    def _keep_parked(self, t: Transfer, now: float) -> None:
        key = t.key
        self.parked[key] = t
        self.parked.move_to_end(key)
        self.parked_at[key] = now
        mine = self.parked_by_device.setdefault(t.device_id, OrderedDict())
        mine[key] = None
        mine.move_to_end(key)
        while len(mine) > self.parked_per_device:
            self._drop_parked(next(iter(mine)))

    def _drop_parked(self, key: tuple):
        t = self.parked.pop(key, None)
        self.parked_at.pop(key, None)
        mine = self.parked_by_device.get(key[0])
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self.parked_by_device[key[0]]
        return t

    def expire(self, now: float) -> None:
        while self.parked:
            key = next(iter(self.parked))
            if self.parked_at[key] + self.parked_ttl > now:
                return
            self._drop_parked(key)

    def next_expiry(self) -> float | None:
        if not self.parked:
            return None
        return self.parked_at[next(iter(self.parked))] + self.parked_ttl

    def ended(self, t: Transfer) -> None:
        if t.state == "parked":
            self._keep_parked(t, t.finished_at or 0.0)
            return
        self._append(t)

    def _append(self, t: Transfer) -> None:
        if self.finished.maxlen == 0:
            return
        if len(self.finished) == self.finished.maxlen:
            self.finished_by_id.pop(self.finished[0].transfer_id, None)
        self.finished.append(t)
        self.finished_by_id[t.transfer_id] = t

    def park(self, t: Transfer, reason: str, now: float = 0.0) -> None:
        """An offer refused before it became an upload (no node for it now)."""
        existing = self.parked.get(t.key)
        if existing is not None:
            t = existing
        parked_entry(t, reason)
        self._keep_parked(t, now)

    def unpark(self, key: tuple, now: float) -> None:
        t = self._drop_parked(key)
        if t is not None:
            resumed(t, now)
            self._append(t)

    def ended_restore(self, transfer_id: str, device_id: str) -> bool:
        t = self.finished_by_id.get(transfer_id)
        return t is not None and t.kind == "restore" and t.device_id == device_id

    def status(self) -> list:
        return [t.status() for t in self.parked.values()] + [t.status() for t in self.finished]
