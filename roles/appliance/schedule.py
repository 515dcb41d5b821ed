"""Weekly bandwidth windows: `{days: mon-fri, from: "08:00", to: "18:00", limit: 10Mbit}`.

The first window that contains the moment wins; outside every window the
agent's `limit` applies. A limit is a rate (bytes/s), None (unlimited) or
"yield" (leave the link to interactive traffic).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from roles.units import parse_rate

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
YIELD = "yield"


def parse_limit(value):
    """A rate in bytes/s, None for unlimited, or YIELD; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == YIELD:
        return YIELD
    return parse_rate(value)


def parse_days(text: str) -> frozenset:
    days = set()
    for part in str(text).lower().replace(" ", "").split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in DAYS or b not in DAYS:
                raise ValueError(f"{text!r}: days are mon..sun")
            i, j = DAYS.index(a), DAYS.index(b)
            span = range(i, j + 1) if i <= j else list(range(i, 7)) + list(range(0, j + 1))
            days.update(span)
        elif part in DAYS:
            days.add(DAYS.index(part))
        elif part in ("all", "*", "daily"):
            days.update(range(7))
        else:
            raise ValueError(f"{text!r}: days are mon..sun, ranges like mon-fri, or all")
    return frozenset(days)


def parse_clock(text) -> int:
    """Seconds after midnight from 'HH:MM' or 'HH:MM:SS' (24:00 is the end of the day)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{text!r} is not a time like 08:00") from None
    if len(parts) not in (2, 3) or any(p < 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        raise ValueError(f"{text!r} is not a time like 08:00")
    hours, minutes, seconds = (parts + [0])[:3]
    value = hours * 3600 + minutes * 60 + seconds
    if value > 24 * 3600:
        raise ValueError(f"{text!r} is not a time like 08:00")
    return value


@dataclass(frozen=True)
class Window:
    days: frozenset
    start_s: int
    end_s: int
    limit: object
    label: str

    def contains(self, moment: dt.datetime) -> bool:
        second = moment.hour * 3600 + moment.minute * 60 + moment.second
        if self.start_s <= self.end_s:
            return moment.weekday() in self.days and self.start_s <= second < self.end_s
        # over midnight: the part after midnight belongs to the previous day's window
        if second >= self.start_s:
            return moment.weekday() in self.days
        return second < self.end_s and (moment.weekday() - 1) % 7 in self.days


def parse_window(item: dict, index: int) -> Window:
    if not isinstance(item, dict):
        raise ValueError(f"schedule[{index}] must be a mapping")
    unknown = set(item) - {"days", "from", "to", "limit"}
    if unknown:
        raise ValueError(f"schedule[{index}]: unknown key {sorted(unknown)[0]!r} (known: days, from, to, limit)")
    for key in ("days", "from", "to", "limit"):
        if key not in item:
            raise ValueError(f"schedule[{index}]: '{key}' is required")
    label = f"{item['days']} {item['from']}-{item['to']}"
    return Window(parse_days(item["days"]), parse_clock(item["from"]), parse_clock(item["to"]),
                  parse_limit(item["limit"]), label)


def limit_at(windows, default, moment: dt.datetime) -> tuple[object, str]:
    """(limit, what set it) at a local moment."""
    for window in windows:
        if window.contains(moment):
            return window.limit, f"schedule {window.label}"
    return default, "limit"
