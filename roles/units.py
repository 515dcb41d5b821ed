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
    if isinstance(value, bool):
        raise ValueError("expected a size like 1MiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 1MiB, got {type(value).__name__}")
    match = _NUMBER.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use e.g. 512KiB, 1MiB, 5MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


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
    if isinstance(value, bool):
        raise ValueError("expected a duration like 15m, got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like 15m, got {type(value).__name__}")
    match = _NUMBER.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 90s, 15m, 1h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
