"""The broker's `quota` key: which byte quota each device has (roles/controller/quota.py counts
and enforces it).

`{"office-7": "1TiB", "office-*": "500GiB", "*": "10TiB", "vip-1": none}`: a
device's quota is its exact id's if listed, else the longest shell pattern
(`fnmatch`: `*`, `?`, `[...]`, `[!...]`) that matches it (equal lengths: the
first in the file), else unlimited. Sizes are `roles/units.py`'s; `none`
makes a device (or a pattern) unlimited where a broader pattern would not.
A pattern is made of id characters and wildcards only, with its brackets
closed, so a typo is refused at start (exit 2 naming `quota`) instead of
matching nothing. Its own module (not in controller/) because config.py,
which every role loads, parses it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cached_property

from roles.units import parse_size
from schemas import is_valid_id

WILDCARDS = "*?["
ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@dataclass(frozen=True)
class QuotaRules:
    """The `quota` mapping, parsed: exact ids and patterns with their limit in bytes (None: unlimited)."""

    exact: tuple = ()  # ((device_id, limit), ...)
    patterns: tuple = ()  # ((pattern, limit), ...), longest first, equal lengths in file order

    @cached_property
    def _exact(self) -> dict:
        return dict(self.exact)

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def limit_for(self, device_id: str) -> int | None:
        """The quota of `device_id` in bytes, None for unlimited. O(patterns): callers cache it."""
        if device_id in self._exact:
            return self._exact[device_id]
        for pattern, limit in self.patterns:
            if fnmatch.fnmatchcase(device_id, pattern):
                return limit
        return None


def parse_quota(value) -> QuotaRules:
    """`{"office-7": "1TiB", "office-*": "500GiB", "*": "10TiB"}` -> QuotaRules; ValueError naming the entry."""
    if value is None:
        return QuotaRules()
    if not isinstance(value, dict):
        raise ValueError('expected a mapping of device id or pattern to a size, like {"office-*": 500GiB}')
    exact, patterns = [], []
    for key, size in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{key!r}: a device id or pattern is a string (quote it)")
        if size is None or (isinstance(size, str) and size.strip().lower() == "none"):
            limit = None
        else:
            try:
                limit = parse_size(size)
            except ValueError as exc:
                raise ValueError(f"{key!r}: {exc}") from None
        if any(c in key for c in WILDCARDS):
            _check_pattern(key)
            patterns.append((key, limit))
        elif is_valid_id(key):
            exact.append((key, limit))
        else:
            raise ValueError(f"{key!r} is neither a device id ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}}) nor a pattern")
    # sorted() is stable: patterns of equal length keep the file's order
    return QuotaRules(tuple(exact), tuple(sorted(patterns, key=lambda p: -len(p[0]))))


def _check_pattern(pattern: str) -> None:
    """Shell wildcards over id characters only, brackets closed and not empty: anything else could
    match no id (a typo an operator should hear about at start, not find in a bill)."""
    if len(pattern) > 128:
        raise ValueError(f"{pattern[:32]!r}...: a pattern is at most 128 characters")
    start = None  # index of the open [ (or [!), while inside one
    for i, c in enumerate(pattern):
        if start is None:
            if c == "[":
                start = i + 1 + (pattern[i + 1:i + 2] == "!")
            elif c not in ID_CHARS and c not in "*?":
                raise ValueError(f"{pattern!r}: {c!r} is neither an id character nor * ? [...]")
        elif c == "]":
            if i == start:
                raise ValueError(f"{pattern!r}: an empty [...]")
            start = None
        elif i >= start and c not in ID_CHARS:
            raise ValueError(f"{pattern!r}: {c!r} inside [...] is not an id character")
    if start is not None:
        raise ValueError(f"{pattern!r}: a [ without its ]")
