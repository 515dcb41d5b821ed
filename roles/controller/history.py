"""Transfers that ended, for status: bounded, with one append path.

`finished` keeps the last N ended transfers (and an index by id, so that
late restore credit is recognised); `parked` holds, per snapshot, the offer
waiting for its node until the device offers it again.
"""

from __future__ import annotations

from collections import deque

from roles.controller.transfers import Transfer, parked_entry, resumed


class History:
    def __init__(self, keep: int):
        self.finished: deque = deque(maxlen=keep)
        self.finished_by_id: dict[str, Transfer] = {}
        self.parked: dict[tuple, Transfer] = {}  # (device, dataset, snapshot) -> parked offer

    def ended(self, t: Transfer) -> None:
        if t.state == "parked":
            self.parked[t.key] = t
            return
        self._append(t)

    def _append(self, t: Transfer) -> None:
        if self.finished.maxlen == 0:
            return
        if len(self.finished) == self.finished.maxlen:
            self.finished_by_id.pop(self.finished[0].transfer_id, None)
        self.finished.append(t)
        self.finished_by_id[t.transfer_id] = t

    def park(self, t: Transfer, reason: str) -> None:
        """An offer refused before it became an upload (no node for it now)."""
        existing = self.parked.get(t.key)
        if existing is not None:
            t = existing
        parked_entry(t, reason)
        self.parked[t.key] = t

    def unpark(self, key: tuple, now: float) -> None:
        t = self.parked.pop(key, None)
        if t is not None:
            resumed(t, now)
            self._append(t)

    def ended_restore(self, transfer_id: str, device_id: str) -> bool:
        t = self.finished_by_id.get(transfer_id)
        return t is not None and t.kind == "restore" and t.device_id == device_id

    def status(self) -> list:
        return [t.status() for t in self.parked.values()] + [t.status() for t in self.finished]
