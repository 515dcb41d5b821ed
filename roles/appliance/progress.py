"""Progress on a terminal: bytes, rate and ETA per transfer; silent otherwise."""

from __future__ import annotations

import sys

from roles.units import format_bytes


class Progress:
    def __init__(self, stream=None, min_interval_s: float = 0.5):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._lines = 0

    def show(self, now: float, rows: list[tuple[str, int, int, float]]) -> None:
        """rows: (label, bytes_done, bytes_total, seconds_elapsed)."""
        if not self.enabled or now - self._last < self.min_interval_s:
            return
        self._last = now
        out = []
        if self._lines:
            out.append(f"\x1b[{self._lines}F")
        for label, done, total, elapsed in rows:
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else float("inf")
            pct = 100.0 * done / total if total else 100.0
            eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
            out.append(f"\x1b[2K{label:<32} {pct:5.1f}% {format_bytes(done):>10} / {format_bytes(total):<10} "
                       f"{format_bytes(rate):>10}/s ETA {eta_text}\n")
        for _ in range(max(0, self._lines - len(rows))):
            out.append("\x1b[2K\n")
        self._lines = max(len(rows), self._lines)
        self.stream.write("".join(out))
        self.stream.flush()

    def done(self) -> None:
        self._lines = 0
