"""Durable writes in one helper: temporary name, fsync, rename, fsync the directory.

After `write_durable` returns, the file is whole under its final name across
a crash or power loss; before, the final name does not exist. Temporary files
carry TEMP_SUFFIX so that `remove_temp_files` can clear a crash's leftovers.
A directory is durable once its parent is fsync'd after it was made:
`make_dirs` does that for every directory it creates.

Every call that makes something durable (fsync, rename, link, mkdir) goes
through a `DiskIO`. The default is the plain system call; the storage node's
fault component (roles/storenode/faults.py) stands in its own, to fail a
write or to record each fsync as it happens: no monkeypatching.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_SUFFIX = ".partial"


class DiskIO:
    """The system calls of a durable write, one method each."""

    def before_write(self, nbytes: int) -> None:
        pass

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def rename(self, src, dst) -> None:
        os.rename(src, dst)

    def link(self, src, dst) -> None:
        os.link(src, dst)

    def mkdir(self, path) -> None:
        os.mkdir(path, 0o755)


PLAIN = DiskIO()


def fsync_dir(path: str | os.PathLike, io: DiskIO = PLAIN) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        io.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike, io: DiskIO = PLAIN) -> None:
    """`mkdir -p`, durably: each directory made here is fsync'd in its parent.

    A directory another thread made meanwhile (EEXIST) has its parent
    fsync'd too: that thread may not have got there yet.
    """
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            io.mkdir(directory)
        except FileExistsError:
            if not directory.is_dir():
                raise
        fsync_dir(directory.parent, io)


def make_subdirs(parent: str | os.PathLike, names, io: DiskIO = PLAIN) -> int:
    """Make `parent` and each missing `parent/<name>` durably, with one fsync of
    `parent` for all of them; returns how many were made."""
    parent = Path(parent)
    make_dirs(parent, io)
    made = 0
    for name in names:
        try:
            io.mkdir(parent / name)
            made += 1
        except FileExistsError:
            pass
    if made:
        fsync_dir(parent, io)
    return made


def write_durable(path: str | os.PathLike, parts, write_hook=None, *, io: DiskIO = PLAIN,
                  replace: bool = True) -> int:
    """Write `parts` (bytes-like objects) to `path` durably; returns bytes written.

    `write_hook(nbytes)` (and `io.before_write`) runs before each write: the
    fault layer uses it to slow or fail a disk. With `replace=False` an
    existing file is never overwritten: FileExistsError, and nothing changes
    (the temporary is linked to the name, which the kernel refuses if taken).
    The parent directory must exist (make_dirs).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    total = 0
    try:
        for part in parts:
            view = memoryview(part)
            if write_hook is not None:
                write_hook(len(view))
            io.before_write(len(view))
            while view:
                n = os.write(fd, view)
                total += n
                view = view[n:]
        io.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        if replace:
            io.rename(tmp, path)
        else:
            io.link(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not replace:
        os.unlink(tmp)
    fsync_dir(path.parent, io)
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
