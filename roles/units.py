"""Human units for sizes and rates, parsed in one place.

Sizes: `1MiB`, `512KiB`, `5MB`, `1GiB`, plain integers (bytes).
Rates: bits (`40Mbit`, `100kbit`) or bytes (`5MB`, `1MiB`) per second,
returned in bytes per second; `none` means unlimited (None).
Durations: `500ms`, `90s`, `15m`, `1h`, `7d`, plain numbers (seconds),
returned in seconds.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_BIT_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(value) -> int:
    """Bytes from an int or a string like '1MiB'; ValueError otherwise."""
    return int(_quantity(value, _SIZE_UNITS, "size", "1MiB", "512KiB, 1MiB, 5MB", (int,)))


def parse_rate(value) -> int | None:
    """Bytes per second from '40Mbit', '5MB', an int, or None for 'none'."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str):
        match = _NUMBER.fullmatch(value)
        if match and match.group(2).lower() in _BIT_UNITS:
            return int(float(match.group(1)) * _BIT_UNITS[match.group(2).lower()] / 8)
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate (use e.g. 40Mbit, 5MB, none)") from None


def parse_duration(value) -> float:
    """Seconds from a number or a string like '15m', '90s', '500ms', '7d'; ValueError otherwise."""
    return float(_quantity(value, _DURATION_UNITS, "duration", "15m", "500ms, 90s, 15m, 1h, 7d", (int, float)))


def _quantity(value, units: dict, kind: str, example: str, examples: str, plain: tuple):
    """A plain non-negative number of one of the types `plain`, or '<number><unit>' with a unit of `units`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind} like {example}, got a boolean")
    if isinstance(value, plain):
        if value < 0:
            raise ValueError(f"a {kind} cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a {kind} like {example}, got {type(value).__name__}")
    match = _NUMBER.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in units:
        raise ValueError(f"{value!r} is not a {kind} (use e.g. {examples})")
    return float(match.group(1)) * units[unit]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
