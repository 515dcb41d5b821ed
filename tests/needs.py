"""What a test does when the machine lacks something it needs (root, a shaped link, Prometheus):
it skips, naming the reason, unless CI (or the variable that requires it) is set, and then it fails.
CI runs as root with every Debian package installed by `make test`, so a skip there would hide a
feature that went untested."""

from __future__ import annotations

import os

import pytest


def _set(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false")


def unavailable(what: str, reason: str, required_by: str | None = None):
    """Skip (or, where required, fail) a test for which `what` is unavailable."""
    for name in (required_by, "CI"):
        if name and _set(name):
            pytest.fail(f"{name} is set but {what} is unavailable: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")
