"""The bandwidth limit in force: the config's `limit`, unless a schedule
window says otherwise; `yield` hands the number to the YieldController."""

from __future__ import annotations

import datetime as dt

from roles.appliance.schedule import YIELD, limit_at
from roles.appliance.yielding import YieldController
from roles.units import format_bytes


class Bandwidth:
    def __init__(self, limit, schedule: tuple, target_ms: int):
        self.limit = limit
        self.schedule = schedule
        self.target_ms = target_ms
        self._controller: YieldController | None = None  # kept across fixed-limit windows
        self.set_by = "limit"
        self.mode = None

    def reconfigure(self, limit, schedule: tuple, target_ms: int) -> None:
        self.limit, self.schedule, self.target_ms = limit, schedule, target_ms
        if self._controller is not None:
            self._controller.target_s = target_ms / 1000

    @property
    def yielding(self) -> YieldController | None:
        """The yield controller while yield is the limit in force."""
        return self._controller if self.mode == YIELD else None

    def current(self, now: float, moment: dt.datetime) -> int | None:
        """Bytes per second allowed now (None: unlimited); `moment`: the local wall time, for the schedule."""
        mode, self.set_by = limit_at(self.schedule, self.limit, moment)
        if mode == YIELD:
            if self._controller is None:
                self._controller = YieldController(now, target_s=self.target_ms / 1000)
            elif self.mode != YIELD:
                self._controller.resume(now)  # back from a fixed limit: the path's base delay and peak stay
            self.mode = YIELD
            return self._controller.current_rate(now)
        self.mode = mode
        return mode

    def describe(self, rate: int | None) -> dict:
        text = ("yield" if self.mode == YIELD else "none" if rate is None
                else f"{rate * 8 / 1e6:.1f} Mbit/s ({format_bytes(rate)}/s)")
        doc = {"limit": text, "rate_bytes_per_s": rate, "set_by": self.set_by}
        if self.yielding is not None:
            doc["queue_delay_ms"] = round(self.yielding.queue_delay_s * 1000, 1)
            base = self.yielding.base_delay_s
            doc["base_delay_ms"] = None if base is None else round(base * 1000, 1)
            peak = self.yielding.peak_delivery_rate
            doc["peak_delivery_bytes_per_s"] = None if peak is None else int(peak)
        return doc
