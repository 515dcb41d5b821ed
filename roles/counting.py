"""Counts keyed by device, node or state that must not keep zero entries.

A table counted per device would otherwise grow by one entry per device ever
seen; `decrement` drops the key when its count reaches zero.
"""

from __future__ import annotations

from typing import MutableMapping


def decrement(counts: MutableMapping, key, n: int = 1) -> int:
    """Take `n` from `counts[key]`, removing the key at zero or below; returns what is left."""
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
    return max(left, 0)
