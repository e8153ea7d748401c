"""File locks and atomic file replacement, safe across processes.

Reserved names
--------------
Everything polystore itself puts on disk is a hidden file whose name starts
with ``.polystore-`` (:data:`RESERVED_PREFIX`):

* ``.polystore-tmp-<pid>-<random>``: a file being written. It is renamed onto
  its target once complete; a writer killed mid-write leaves it behind. The
  writer's pid in the name lets :func:`remove_stale` tell a live writer's file
  from a dead one's.
* ``.polystore-lock-<name>``: the lock file of :func:`file_lock` for the path
  ``<name>`` in the same directory. It exists only while the lock is held (or
  was held by a process that died).
* ``.polystore-lock``: a directory's commit lock, which
  :class:`~polystore.DiskBackend` holds for the few microseconds it takes to
  rename a finished file (and its metadata) into place, on file systems that
  refuse to lock a directory itself (NFS). It exists only while it is held.
  Elsewhere the commit lock is a lock on the directory, which leaves no file:
  a directory holds exactly what was saved in it.
* ``.polystore-meta-<name>.json``: the metadata saved with ``<name>`` by
  :class:`~polystore.DiskBackend`.

A name too long to carry the prefix is replaced by a hash of it. The disk
backend leaves these names out of every listing and refuses user paths that
use the prefix.

Where locks live, and why
-------------------------
:func:`file_lock` locks a hidden sibling of the path rather than the path
itself or a file in a central lock directory:

* the data file is replaced by ``os.replace`` on every atomic write, so a lock
  on its inode would protect a file that no longer has the name;
* a sibling is on the same file system as the data, visible to every process
  (and, with a shared file system, every machine) that sees the data, and
  needs no agreement on a lock directory; it goes wherever the data goes;
* being hidden and reserved, it never shows up in a polystore listing.

Locks are ``flock`` locks taken through portalocker. The kernel releases them
when their holder dies, however it dies, so a killed worker never leaves a
lock held. The releasing holder removes the lock file, so a directory does not
fill with lock files; a waiter that then finds it locked a removed file simply
opens the new one and tries again. Locks are per open file, so two threads of
one process exclude each other, and a lock is not re-entrant: taking the same
lock twice in one thread waits for itself.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ._args import check_timeout
from ._atomic import TEMP_PREFIX, remove_quietly, write_atomic
from ._renamed import IGNORED, renamed_keywords
from .exceptions import LockTimeoutError, UnsupportedFormatError
from .paths import RESERVED_PREFIX, as_str

__all__ = [
    "DIR_LOCK_NAME",
    "LOCK_PREFIX",
    "META_PREFIX",
    "RESERVED_PREFIX",
    "STALE_AFTER",
    "TEMP_PREFIX",
    "atomic_update_json",
    "file_lock",
    "is_reserved",
    "lock_path",
    "remove_stale",
]

LOCK_PREFIX = ".polystore-lock-"
DIR_LOCK_NAME = ".polystore-lock"
META_PREFIX = ".polystore-meta-"
#: seconds a dead writer's temporary file is kept before :func:`remove_stale` removes it
STALE_AFTER = 600.0

_NAME_MAX = 255
# Polling interval while waiting with a timeout: short enough that a lock held
# for microseconds is taken almost at once, capped so waiters cost no CPU.
_POLL_START = 0.0001
_POLL_MAX = 0.01


def is_reserved(name: str) -> bool:
    """Whether a file name belongs to polystore (temporary, lock or metadata file)."""
    return name.startswith(RESERVED_PREFIX)


def reserved_name(prefix: str, name: str, suffix: str = "") -> str:
    """``prefix + name + suffix``, with ``name`` hashed if the result is too long."""
    out = prefix + name + suffix
    if len(os.fsencode(out)) > _NAME_MAX:
        out = prefix + "#" + hashlib.sha256(os.fsencode(name)).hexdigest() + suffix
    return out


def lock_path(path: str | os.PathLike[str]) -> str:
    """The lock file :func:`file_lock` uses for ``path``: a hidden sibling."""
    text = os.path.normpath(as_str(path))
    directory, name = os.path.split(text)
    if name in ("", ".", ".."):
        raise ValueError(f"cannot lock {text!r}: it has no file name to put a lock beside")
    return os.path.join(directory, reserved_name(LOCK_PREFIX, name))


# -- locking -------------------------------------------------------------------


class _Portalocker(NamedTuple):
    lock: Callable[[int, Any], None]
    unlock: Callable[[int], None]
    already_locked: type[Exception]
    failed: type[Exception]
    flags: dict[tuple[bool, bool], Any]  # (shared, wait) -> LockFlags


@functools.cache
def _portalocker() -> _Portalocker:
    import portalocker
    from portalocker import portalocker as implementation

    # Pin flock: its locks belong to an open file, so threads exclude each
    # other and closing an unrelated descriptor releases nothing, which
    # lockf-style locks do not promise. (Older portalocker only has the
    # module-level functions, whose default is flock too.)
    flock_locker = getattr(implementation, "FlockLocker", None)
    api = flock_locker() if flock_locker is not None else portalocker
    f = portalocker.LockFlags
    flags = {
        (shared, wait): (f.SHARED if shared else f.EXCLUSIVE) | (0 if wait else f.NON_BLOCKING)
        for shared in (False, True)
        for wait in (False, True)
    }
    return _Portalocker(
        api.lock, api.unlock, portalocker.AlreadyLocked, portalocker.LockException, flags
    )


def _open_lock_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _is_current(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file named ``path`` (its holder may have removed it)."""
    mine = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_ino, mine.st_dev) == (named.st_ino, named.st_dev)


def _flock(fd: int, *, shared: bool, wait: bool) -> bool:
    """Lock ``fd``; ``False`` if a non-blocking attempt found it taken."""
    pl = _portalocker()
    try:
        pl.lock(fd, pl.flags[shared, wait])
    except pl.already_locked:
        return False
    except pl.failed as exc:
        # Hand back the operating system's error (ENOLCK, EBADF, ...) rather
        # than portalocker's wrapper, so callers can catch OSError.
        if isinstance(exc.__cause__, OSError):
            raise exc.__cause__ from None
        raise
    return True


def acquire(
    path: str,
    timeout: float | None,
    *,
    shared: bool = False,
    removable: bool = True,
    name: str | None = None,
) -> int:
    """Open and lock the lock file ``path``; return its descriptor.

    Args:
        path: the lock file itself.
        timeout: seconds to wait; ``None`` waits as long as it takes.
        shared: take a shared (read) lock instead of an exclusive one.
        removable: holders of this lock file remove it on release, so check
            after locking that the file still has its name.
        name: the path the lock protects, for the error message.

    Raises:
        LockTimeoutError: the lock was still held by another after ``timeout``.
    """
    start = time.monotonic()
    while True:
        fd = _open_lock_file(path)
        try:
            if timeout is None:
                _flock(fd, shared=shared, wait=True)
            elif not _flock_until(fd, shared, start + timeout):
                raise LockTimeoutError(name or path, timeout)
            if not removable or _is_current(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removed the file we locked: lock the new one.
        os.close(fd)


def _flock_until(fd: int, shared: bool, deadline: float) -> bool:
    """Poll for the lock until ``deadline`` (flock itself cannot time out)."""
    delay = _POLL_START
    while not _flock(fd, shared=shared, wait=False):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)
    return True


def release(fd: int, path: str, *, shared: bool = False, removable: bool = True) -> None:
    """Unlock and close a descriptor from :func:`acquire`, removing the lock file if we may."""
    try:
        # Removing the file is safe only under an exclusive lock: a shared
        # holder first tries to become the only holder, and leaves the file to
        # the last one if it cannot.
        if (
            removable
            and (not shared or _flock(fd, shared=False, wait=False))
            and _is_current(fd, path)
        ):
            remove_quietly(path)
        # Unlock explicitly: a forked child may share this descriptor, and
        # closing our copy would not release the lock for it.
        _portalocker().unlock(fd)
    finally:
        os.close(fd)


@renamed_keywords(poll_interval=IGNORED)  # the original's; the wait backs off by itself
@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str], timeout: float | None = None, shared: bool = False
) -> Iterator[str]:
    """Hold an inter-process lock on ``path`` for the duration of a ``with`` block.

    The path itself is not touched and need not exist; the lock lives in the
    hidden sibling ``.polystore-lock-<name>``, created on entry (with missing
    parent directories) and removed on exit. Every process that locks the same
    path excludes the others, whichever way it reaches the path.

    Args:
        path: the path to lock.
        timeout: seconds to wait for the lock; ``None`` (the default) waits
            as long as it takes, ``0`` tries once.
        shared: take a shared lock: shared holders exclude exclusive ones but
            not each other.

    Yields:
        the path of the lock file.

    Raises:
        LockTimeoutError: another process still held the lock after ``timeout``
            seconds (a ``TimeoutError``).

    Example:
        >>> with file_lock("results/summary.json", timeout=10):  # doctest: +SKIP
        ...     update_the_summary()
    """
    wait = check_timeout(timeout)
    target = lock_path(path)
    fd = acquire(target, wait, shared=shared, name=as_str(path))
    try:
        yield target
    finally:
        release(fd, target, shared=shared)


@renamed_keywords(lock_timeout="timeout", default_data="default")  # the original's names
def atomic_update_json(
    path: str | os.PathLike[str],
    update_fn: Callable[[Any], Any],
    default: Any = None,
    timeout: float | None = None,
    *,
    fsync: bool = False,
) -> Any:
    """Read, update and rewrite a JSON file as one step no other process can split.

    Under :func:`file_lock` on ``path``: the current value is read (a deep copy
    of ``default`` if the file does not exist), passed to ``update_fn``, and
    what it returns is written back atomically. If ``update_fn`` raises, or
    its result is not JSON, the file is left as it was.

    Args:
        path: the JSON file.
        update_fn: takes the current value and returns the new one (it may
            modify its argument and return it).
        default: the value used when the file does not exist yet.
        timeout: seconds to wait for the lock, as for :func:`file_lock`.
        fsync: flush the new file to stable storage before renaming it.

    Returns:
        The new value, as written.

    Raises:
        LockTimeoutError: the lock could not be taken within ``timeout``.
        UnsupportedFormatError: the new value cannot be written as JSON.

    Example:
        >>> atomic_update_json("counter.json", lambda n: n + 1, default=0)  # doctest: +SKIP
        1
    """
    target = as_str(path)
    with file_lock(target, timeout=timeout):
        try:
            with open(target, "rb") as f:
                value = json.load(f)
        except FileNotFoundError:
            value = copy.deepcopy(default)
        new = update_fn(value)
        try:
            payload = json.dumps(new).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise UnsupportedFormatError(
                target, reason=f"update_fn returned a value that is not JSON-serialisable: {exc}"
            ) from exc
        write_atomic(target, payload, fsync=fsync)
    return new


@contextlib.contextmanager
def directory_lock(directory: str, timeout: float | None) -> Iterator[None]:
    """Hold ``directory``'s commit lock.

    The lock is taken on the directory itself, so that committing a file
    leaves nothing else behind in it. Where the file system refuses that, it
    is the lock file ``.polystore-lock``, removed again on release.
    """
    fd = _lock_directory(directory, timeout)
    if fd is None:
        target = os.path.join(directory, DIR_LOCK_NAME)
        fd = acquire(target, timeout, name=directory)
        try:
            yield
        finally:
            release(fd, target)
        return
    try:
        yield
    finally:
        try:
            _portalocker().unlock(fd)  # explicitly: a forked child may share fd
        finally:
            os.close(fd)


#: what flock on a directory gives where the file system cannot lock one; NFS
#: emulates flock with byte-range locks, which need a file open for writing
_NO_DIRECTORY_LOCKS = frozenset({errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP})


def _lock_directory(directory: str, timeout: float | None) -> int | None:
    """Lock the directory's own descriptor; ``None`` where that is not possible."""
    fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        if timeout is None:
            _flock(fd, shared=False, wait=True)
        elif not _flock_until(fd, False, time.monotonic() + timeout):
            raise LockTimeoutError(directory, timeout)
    except LockTimeoutError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_DIRECTORY_LOCKS:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- leftovers of killed processes -------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_unheld_lock(path: str) -> bool:
    """Remove a per-path lock file nobody holds; ``False`` if someone does."""
    try:
        fd = acquire(path, 0.0)
    except LockTimeoutError:
        return False
    except FileNotFoundError:
        return False
    release(fd, path)
    return True


def remove_stale(
    directory: str, max_age: float = STALE_AFTER, lock_timeout: float | None = None
) -> list[str]:
    """Remove what killed processes left in ``directory``; return the removed names.

    * temporary files whose writer is no longer running and that were last
      written more than ``max_age`` seconds ago (the age guards against pids
      of other machines or containers sharing the directory, which look dead
      from here);
    * lock files that nobody holds (a live holder's are kept);
    * metadata files whose data file is gone, checked under the directory's
      commit lock (waiting at most ``lock_timeout`` seconds for it).
    """
    removed = []
    now = time.time()
    with os.scandir(directory) as entries:
        found = [(e.name, e.path) for e in entries if is_reserved(e.name)]
    for name, path in found:
        if name.startswith(TEMP_PREFIX):
            if _stale_temp(name, path, now, max_age):
                removed.append(name)
        elif name.startswith(LOCK_PREFIX) or name == DIR_LOCK_NAME:
            if _remove_unheld_lock(path):
                removed.append(name)
        elif name.startswith(META_PREFIX) and _remove_orphan_metadata(
            directory, name, lock_timeout
        ):
            removed.append(name)
    return sorted(removed)


def _stale_temp(name: str, path: str, now: float, max_age: float) -> bool:
    """Remove a dead writer's temporary file; ``True`` if it was removed."""
    head = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    owner = int(head) if head.isdigit() else None
    try:
        age = now - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    if age < max_age or (owner is not None and pid_alive(owner)):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _remove_orphan_metadata(directory: str, name: str, lock_timeout: float | None) -> bool:
    data_name = name[len(META_PREFIX) : -len(".json")]
    data_path = os.path.join(directory, data_name)
    if data_name.startswith("#") or os.path.lexists(data_path):
        return False  # a hashed name cannot be traced back to its file
    with directory_lock(directory, lock_timeout):
        if os.path.lexists(data_path):
            return False
        remove_quietly(os.path.join(directory, name))
    return True
