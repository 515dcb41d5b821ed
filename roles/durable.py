"""Durable writes in one helper: temporary name, fsync, rename, fsync the directory.

After `write_durable` returns, the file is whole under its final name across
a crash or power loss; before, the final name does not exist. Temporary files
carry TEMP_SUFFIX so that `remove_temp_files` can clear a crash's leftovers.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_SUFFIX = ".partial"


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, parts, write_hook=None) -> int:
    """Write `parts` (bytes-like objects) to `path` durably; returns bytes written.

    `write_hook(nbytes)` runs before each write: the fault layer uses it to
    slow or fail a disk without monkeypatching.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    total = 0
    try:
        for part in parts:
            view = memoryview(part)
            if write_hook is not None:
                write_hook(len(view))
            while view:
                n = os.write(fd, view)
                total += n
                view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    return total


def remove_temp_files(root: str | os.PathLike) -> int:
    """Delete leftovers of interrupted writes below `root`; returns how many."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(TEMP_SUFFIX):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed
