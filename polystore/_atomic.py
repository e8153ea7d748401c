"""Writing files so that readers never see half of one.

A file is written under a hidden temporary name in its target's directory and
then renamed onto the target (``os.replace``), or linked there when nothing
may be overwritten (``link_new``): a reader, or a process that dies mid-write,
sees the old file or the new one, never a mix. Temporary names carry the
writer's pid, so :func:`polystore.locks.remove_stale` can tell a live writer's
file from a dead one's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import BinaryIO

__all__ = [
    "TEMP_PREFIX",
    "fsync_dir",
    "link_new",
    "remove_quietly",
    "write_atomic",
    "write_temp",
]

TEMP_PREFIX = ".polystore-tmp-"
# link() fails with these where the file system has no hard links (some FUSE
# and network file systems, FAT).
_NO_HARDLINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def write_temp(directory: str, writer: Callable[[BinaryIO], object], *, fsync: bool = False) -> str:
    """Write a new hidden temporary file in ``directory`` with ``writer(file)``; return its path.

    Missing directories are created. The file gets the permissions a plain
    ``open(path, "w")`` would give (not :mod:`tempfile`'s owner-only ones),
    because it becomes the data file. It is removed again if ``writer`` fails.

    Raises:
        NotADirectoryError: ``directory`` or one of its parents is a file.
    """
    path = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
    try:
        # Created inside the try: an exception from a signal handler (Ctrl-C)
        # right after the file appears removes it too.
        with _create(path, directory) as f:  # closing flushes, and can fail too (a full disk)
            writer(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        remove_quietly(path)
        raise
    return path


def _create(path: str, directory: str) -> BinaryIO:
    try:
        return open(path, "xb")
    except FileNotFoundError:
        try:
            os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
        return open(path, "xb")


def link_new(src: str, target: str, what: str) -> None:
    """Rename ``src`` to ``target`` only if nothing is at ``target`` yet.

    A hard link fails if the target exists, so of two writers exactly one
    wins. Where the file system has no hard links, the caller must hold the
    directory's commit lock, which keeps other polystore writers out between
    the check and the rename.

    Raises:
        FileExistsError: something is at ``target`` (``IsADirectoryError`` for
            a directory); ``what`` names it in the message.
    """
    try:
        os.link(src, target)
    except FileExistsError:
        kind = IsADirectoryError if os.path.isdir(target) else FileExistsError
        raise kind(errno.EEXIST, os.strerror(errno.EEXIST), what) from None
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), what) from None
        os.replace(src, target)
        return
    os.unlink(src)


def fsync_dir(directory: str) -> None:
    """Flush a directory's entries (a rename in it) to stable storage."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomic(path: str, payload: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``payload``: readers see the old or the new bytes, never a mix."""
    directory = os.path.dirname(path)
    tmp = write_temp(directory, lambda f: f.write(payload), fsync=fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if fsync:
        fsync_dir(directory)
