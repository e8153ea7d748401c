"""The write path of :class:`~polystore.SharedArrayStore`: copying a value in, installing it.

Invariant: a put never writes into a block that a key names. It copies into
a block taken off a free list, then points the key at it in one locked
section, so a process killed at any point leaves the key with its old value
or its new one, and readers of the old value keep seeing it unchanged.

A put of up to :data:`SMALL_PUT` bytes takes the block, copies and installs
in one locked section: if it dies there, the next lock holder rolls the whole
section back. A larger put takes the block in one section (as WRITING, owned
by this process), copies without the lock, and installs in a second; if it
dies in between, the reaper frees the block. Either way the old block is
retired, and freed once no reader pins it; a key put again and again
alternates between two blocks.

:func:`commit` extends this to several keys changed together (a file, its
metadata and its new directories in :mod:`polystore.shm_backend`): every
value is copied into a block of its own first, then one locked section
installs them all and removes what goes, so a kill leaves all of the old
state or all of the new.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from ..exceptions import ShmFullError, StorageError, StoreClosedError
from . import arena as _arena
from . import fast as _fast
from . import faults as _faults
from . import layout as ix
from .alloc import unlink_quietly
from .read import make_meta as _meta

__all__ = [
    "SMALL_PUT",
    "GuardedExit",
    "Related",
    "abandon",
    "commit",
    "create",
    "grow",
    "put",
    "remove",
    "take",
]

#: puts up to this size copy while holding the store lock (one lock round trip)
SMALL_PUT = ix.SMALL_PUT

# Table geometry and field numbers, bound here for the hot path.
_EQ, _BLK, _SEG = ix.ENT_SIZE // 8, ix.BLK_FIELDS, ix.SEG_FIELDS
_E_BLOCK, _E_MSEQ, _E_SEQ, _H_SEQ = ix.E_BLOCK, ix.E_MSEQ, ix.E_SEQ, ix.H_SEQ
_B_SEG, _B_OFF, _S_GEN = ix.B_SEG, ix.B_OFF, ix.S_GEN


def put(
    a: _arena.Arena,
    name: str,
    key: str,
    parts: tuple[bytes, bytes, int],
    arr: np.ndarray[Any, Any],
    flags: int,
    overwrite: bool,
    timeout: float | None = 0,
) -> None:
    """Store a copy of ``arr`` under ``key`` (``parts``: its bytes, bytes + NUL and hash).

    ``timeout``: how long to wait for room (see :func:`take`).
    """
    _, kbz, h = parts
    src, value = _describe(name, arr, flags)
    nbytes = value[0]
    cls = ix.class_of(nbytes) if nbytes else -1
    b = -1
    with a.locked:
        if a.slot < 0:
            a.my_slot()
        i, e = a.find(kbz, h)
        if e >= 0 and not overwrite:
            raise FileExistsError(errno.EEXIST, "key exists", key)
        if nbytes == 0:
            return _install(a, i, e, parts, -1, value)
        if nbytes <= SMALL_PUT:
            b = a.pop_free(cls)
            if b >= 0:
                # Copied while holding the lock: one lock round trip, and a
                # rollback gives the block back if this process dies here.
                if _faults.kill_at:
                    _faults.step()
                _copy(a, b, arr, src, nbytes)
                if _faults.kill_at:
                    _faults.step()
                return _install(a, i, e, parts, b, value)
    mine: list[int] = []  # the block taken, noted by take() as it takes it
    try:
        b = take(a, cls, timeout, mine)
        if _faults.kill_at:
            _faults.step()
        _copy(a, b, arr, src, nbytes)  # outside the lock: no one else sees b
        if _faults.kill_at:
            _faults.step()
        _publish(a, key, parts, b, value, overwrite)
    except BaseException:
        for b in mine:
            abandon(a, b)
        raise


#: the base of context managers whose __exit__ is ``_finish``, with
#: ``_fallback`` run if that raises, even at its first line (``fast.ExitGuard``;
#: without C, a subclass sets ``__exit__ = _finish`` and one bytecode stays open)
GuardedExit: type
if TYPE_CHECKING or _fast.ExitGuard is None:  # noqa: SIM108 (a ternary defeats mypy's narrowing)
    GuardedExit = object
else:
    GuardedExit = _fast.ExitGuard


class create(GuardedExit):
    """Yield a writable array in a block of its own; publish it under ``key`` on exit.

    The block is WRITING and owned by this process while the caller fills
    it, so nobody else sees it, and the reaper frees it if this process
    dies. Leaving the block installs it as a put would (old or new, never a
    mix); an exception frees it instead. The array is pinned like a view
    from ``get``, and read-only once published.

    A class rather than a generator: leaving the block is the hot path of a
    hand-off, and with the caches cold after the caller wrote a large array
    a generator's resume and ``contextlib``'s exit cost tens of
    microseconds (``benchmarks/pipeline.py``, the 512 MB hand-off).
    """

    __slots__ = (
        "a",
        "arr",
        "b",
        "count",
        "dt",
        "dtype",
        "extra",
        "flags",
        "key",
        "nbytes",
        "overwrite",
        "parts",
        "shape",
        "timeout",
        "translate",
    )  # fmt: skip

    def __init__(
        self,
        a: _arena.Arena,
        key: str,
        parts: tuple[bytes, bytes, int],
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        flags: int,
        overwrite: bool,
        timeout: float | None,
        extra: Callable[[], Related] | None = None,
        translate: Callable[[FileExistsError], BaseException] | None = None,
    ) -> None:
        self.extra, self.translate = extra, translate
        self.a, self.key, self.parts, self.shape = a, key, parts, shape
        self.dtype, self.flags, self.overwrite, self.timeout = dtype, flags, overwrite, timeout
        self.dt = ix.encode_dtype(dtype)
        self.count = math.prod(shape)
        self.nbytes = self.count * dtype.itemsize
        self.b = -1
        self.arr: np.ndarray[Any, Any] | None = None

    def __enter__(self) -> np.ndarray[Any, Any]:
        if self.arr is not None:
            raise RuntimeError("a create() block can be entered once")
        a, shape, dtype = self.a, self.shape, self.dtype
        _, kbz, h = self.parts
        if a.slot < 0 or not self.overwrite:  # (publishing checks overwrite=False again)
            with a.locked:
                if a.slot < 0:
                    a.my_slot()
                if not self.overwrite and a.find(kbz, h)[1] >= 0:
                    raise FileExistsError(errno.EEXIST, "key exists", self.key)
        order: Literal["C", "F"] = "F" if self.flags & ix.F_FORTRAN else "C"
        if self.nbytes == 0:
            self.arr = np.empty(shape, dtype, order=order)
            return self.arr
        mine: list[int] = []  # the block taken, noted by take() as it takes it
        try:
            b = take(a, ix.class_of(self.nbytes), self.timeout, mine)
            s, gen, off = a.block_location(b)
            item = a.rw_maps.get(s)
            mm = item[1] if item is not None and item[0] == gen else a.map_segment(s, gen, True)
            arr = np.frombuffer(mm, dtype, self.count, off)
            a.hold_view(arr.base, b)  # pinned like a view: unpinned when the array dies
            if len(shape) != 1:
                arr = arr.reshape(shape, order=order)
        except BaseException:
            for b in mine:
                abandon(a, b)
            raise
        self.b, self.arr = b, arr
        return arr

    # With C, __exit__ is ExitGuard's: it calls _finish and, if that raised
    # (even at its first line, where a signal handler's exception would skip
    # every clean-up below), _fallback, so that the block taken is never left
    # this process's. Without C, _finish is __exit__ (one bytecode stays open).
    def _fallback(self) -> None:
        if self.b >= 0:
            abandon(self.a, self.b)  # (a block published already is left alone)

    def _finish(self, exc_type: object, exc: object, tb: object) -> None:
        a, b, arr = self.a, self.b, self.arr
        assert arr is not None
        try:
            if exc_type is not None:
                if b >= 0:
                    abandon(a, b)
                return  # the exception goes on
            if _faults.kill_at:
                _faults.step()
            value = (self.nbytes, self.dtype, self.dt, self.shape, self.flags)
            # More keys to change in the same step (a file's metadata and
            # directories), found now rather than when the block began.
            rel = self.extra() if self.extra is not None else _NOTHING
            conflicts = list(rel.conflicts)
            if not self.overwrite:
                conflicts.append((self.parts, self.key))
            fast = a.fast
            if b >= 0 and fast is not None and not rel.puts:
                # A new key in C where it can, when nothing else is to do:
                # C checks in the same section that the keys to remove and
                # those in the way are absent and those to ensure there.
                absent = tuple(rel.removals) + tuple(parts for parts, _ in conflicts)
                _, kbz, h = self.parts
                args = (self.nbytes, self.dt, self.shape, self.flags, absent, tuple(rel.ensure))
                if fast.publish(a, kbz, h, b, *args):
                    return
            if b < 0:
                arr.flags.writeable = False
            if rel.puts or rel.removals or rel.ensure or rel.conflicts:  # all in one section
                filled = (self.parts, b, value)
                commit(a, rel.puts, rel.removals, self.timeout, filled, conflicts, None, rel.ensure)
            else:
                _publish(a, self.key, self.parts, b, value, self.overwrite)
        except BaseException as exc:
            if b >= 0:
                abandon(a, b)
            if self.translate is not None and isinstance(exc, FileExistsError):
                raise self.translate(exc) from None  # (the caller's words for it)
            raise
        finally:
            arr.flags.writeable = False

    if TYPE_CHECKING or GuardedExit is object:
        __exit__ = _finish


def _copy(
    a: _arena.Arena,
    b: int,
    arr: np.ndarray[Any, Any],
    src: Any,
    nbytes: int,
) -> None:
    k = b * _BLK  # Arena.block_location, inlined
    s, off = a.bq[k + _B_SEG], a.bq[k + _B_OFF]
    gen = a.sq[s * _SEG + _S_GEN]
    item = a.rw_maps.get(s)
    mm = item[1] if item is not None and item[0] == gen else a.map_segment(s, gen, True)
    if src is not None:
        mm[off : off + nbytes] = src
    else:
        dst: np.ndarray[Any, Any] = np.ndarray(arr.shape, arr.dtype, buffer=mm, offset=off)
        np.copyto(dst, arr, casting="no")


#: (nbytes, dtype, dtype text, shape, flags): what an entry says of its value
Value = tuple[int, np.dtype[Any], bytes, tuple[int, ...], int]
#: a key's (bytes, bytes and NUL, hash)
Parts = tuple[bytes, bytes, int]
#: a value to put: (key parts, array, flags)
Put = tuple[Parts, np.ndarray[Any, Any], int]


def _describe(name: str, arr: np.ndarray[Any, Any], flags: int) -> tuple[Any, Value]:
    """(what to copy from, description) of an array to store (``flags``: F_BYTES or 0).

    Raises ShmFullError for a value larger than any block.
    """
    nbytes = arr.nbytes
    # A C-contiguous array exports its bytes as a plain buffer, whatever its
    # dtype; the transpose of a Fortran-ordered one is C-contiguous.
    layout = arr.flags
    src: Any = None  # None: copied element by element, into C order
    if layout.c_contiguous:
        src = arr
    elif layout.f_contiguous:
        flags |= ix.F_FORTRAN
        src = arr.T
    dt = ix.encode_dtype(arr.dtype)
    if nbytes > ix.CLASS_SIZES[-1]:
        raise ShmFullError(nbytes, ix.CLASS_SIZES[-1], f"shared array store {name!r}")
    return src, (nbytes, arr.dtype, dt, arr.shape, flags)


#: a key to install: (its parts, the block filled for it or -1 if empty, its description)
Install = tuple[tuple[bytes, bytes, int], int, Value]


class Related(NamedTuple):
    """Keys that change in the same step as a value (a file's metadata and directories).

    ``puts``: more values to copy in; ``removals``: keys to remove, skipped
    when absent; ``ensure``: keys made empty (directory markers) when
    absent; ``conflicts``: (parts, name) of keys that must be absent
    (``FileExistsError(name)`` otherwise, nothing changed).
    """

    puts: list[Put]
    removals: list[Parts]
    ensure: list[Parts]
    conflicts: list[tuple[Parts, str]]


_NOTHING = Related([], [], [], [])

#: the description of an empty value of bytes (what ``ensure`` makes)
_EMPTY: Value = (0, np.dtype(np.uint8), ix.encode_dtype(np.dtype(np.uint8)), (0,), ix.F_BYTES)


def commit(
    a: _arena.Arena,
    puts: list[Put],
    removals: list[Parts],
    timeout: float | None,
    filled: Install | None = None,
    conflicts: list[tuple[Parts, str]] | None = None,
    moves: list[tuple[Parts, Parts, str | None]] | None = None,
    ensure: list[Parts] | None = None,
    childless: list[tuple[bytes, str]] | None = None,
) -> None:
    """Install ``filled`` and ``puts``, make ``moves`` and remove ``removals``, in one section.

    ``puts``: (key parts, array, flags) to copy in; ``filled``: a block this
    process already filled (a ``create``), installed first, and freed by
    the caller if this raises; ``removals``: key parts, skipped when
    absent; ``moves``: (source, destination, name) key parts: the source's
    block and description go to the destination, without a copy, and the
    source is removed; an absent source raises ``KeyError(name)``, or, if
    ``name`` is None, removes the destination. ``conflicts``: (parts, name)
    of keys that must be absent (``FileExistsError(name)`` otherwise,
    nothing changed); ``ensure``: keys made empty when absent (directory
    markers); ``childless``: (prefix, name) of directories that must have no
    key under them (``OSError(ENOTEMPTY, name)`` otherwise). ``timeout``:
    how long to wait for room, for all the values together.

    Invariant kept: all or nothing. Each value is copied into a block taken
    off a free list (WRITING, owned by this process: no key names it), and
    only then does one section point every key at its block and remove the
    others. A kill before the section leaves the blocks to the reaper; a
    kill inside it leaves the section to the next lock holder, who rolls it
    back; an exception inside it rolls it back at once (``Arena.abort``).
    Either way every block not installed is freed.
    """
    installs: list[Install] = [] if filled is None else [filled]
    described = [(parts, arr, *_describe(a.name, arr, flags)) for parts, arr, flags in puts]
    mine: list[int] = []  # blocks taken here (the caller frees ``filled``'s if this raises)
    deadline = None if timeout is None else time.monotonic() + timeout  # for all the values
    try:
        for parts, arr, src, value in described:
            b = -1
            if value[0]:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                b = take(a, ix.class_of(value[0]), 0.0 if timeout == 0 else left, mine)
                if _faults.kill_at:
                    _faults.step()
                _copy(a, b, arr, src, value[0])  # outside the lock: no one else sees b
            installs.append((parts, b, value))
        if _faults.kill_at:
            _faults.step()
        with a.locked:
            _commit_section(
                a, installs, removals, conflicts or [], moves or [], ensure or [], childless or []
            )
    except BaseException:
        for b in mine:
            abandon(a, b)  # (a block installed before the exception is live: left alone)
        raise


def _commit_section(
    a: _arena.Arena,
    installs: list[Install],
    removals: list[Parts],
    conflicts: list[tuple[Parts, str]],
    moves: list[tuple[Parts, Parts, str | None]],
    ensure: list[Parts],
    childless: list[tuple[bytes, str]],
) -> None:
    """The locked section of :func:`commit`."""
    if a.slot < 0:
        a.my_slot()
    for prefix, directory in childless:
        if _has_key_under(a, prefix):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), directory)
    for (_, kbz, h), in_the_way in conflicts:
        if a.find(kbz, h)[1] >= 0:
            raise FileExistsError(errno.EEXIST, "key exists", in_the_way)
    installs, removals, moved = list(installs), list(removals), []
    for parts in ensure:  # empty values need no block
        if a.find(parts[1], parts[2])[1] < 0:
            installs.append((parts, -1, _EMPTY))
    for source, target, name in moves:
        e = a.find(source[1], source[2])[1]
        if e < 0:
            if name is not None:
                raise KeyError(name)
            removals.append(target)  # no source: no destination either
            continue
        installs.append((target, a.eq[e * _EQ + _E_BLOCK], _value_of(a, e)))
        moved.append(source)
    # Every fresh entry is taken and written before any entry is freed (see
    # _prepare); slots are found again before linking, as an earlier insert
    # may have taken the empty slot a find gave.
    prepared = [_prepare(a, a.find(p[1], p[2])[1], p, b, v) for p, b, v in installs]
    for (parts, b, value), (seq, fresh) in zip(installs, prepared, strict=True):
        i, e = a.find(parts[1], parts[2])
        _link(a, i, e, parts, b, value, seq, fresh)
    # Invariant kept: a block has one owner. A moved block is named by its
    # source and its destination only inside this section (lock-free readers
    # see the write counter odd and wait); its source leaves the index
    # without retiring it, as the destination holds it now.
    for _, kbz, h in moved:
        i, e = a.find(kbz, h)
        a.remove(i, e)
        a.meta.pop(e, None)
    for _, kbz, h in removals:
        i, e = a.find(kbz, h)
        if e >= 0:
            remove(a, i, e)


def _has_key_under(a: _arena.Arena, prefix: bytes) -> bool:
    """Whether a key other than ``prefix`` itself starts with it (locked; reads every key)."""
    eb, eq = a.eb, a.eq
    n = len(prefix)
    for e in a.entries():
        size = eq[e * _EQ + ix.E_META] & 0xFFFF
        o = e * ix.ENT_SIZE + ix.E_KEY
        if size > n and eb[o : o + n] == prefix:
            return True
    return False


def _value_of(a: _arena.Arena, e: int) -> Value:
    """The description of the value entry ``e`` holds (locked)."""
    dt, shape, flags = a.read_entry(e)
    return a.eq[e * _EQ + ix.E_NBYTES], ix.decode_dtype(dt), dt, shape, flags


def remove(a: _arena.Arena, i: int, e: int) -> None:
    """Remove the key in slot ``i`` (entry ``e``) and retire its block (locked)."""
    old = a.eq[e * _EQ + _E_BLOCK]
    a.remove(i, e)
    a.meta.pop(e, None)
    if old >= 0:
        a.retire(old)


def _publish(
    a: _arena.Arena,
    key: str,
    parts: tuple[bytes, bytes, int],
    b: int,
    value: Value,
    overwrite: bool,
) -> None:
    """Point ``key`` at block ``b``, filled outside the lock, in a section of its own."""
    with a.locked:
        i, e = a.find(parts[1], parts[2])
        if e >= 0 and not overwrite:
            raise FileExistsError(errno.EEXIST, "key exists", key)
        _install(a, i, e, parts, b, value)


def _install(
    a: _arena.Arena,
    i: int,
    e: int,
    parts: tuple[bytes, bytes, int],
    b: int,
    value: Value,
) -> None:
    """Point the key (slot ``i``, entry ``e`` from find) at block ``b`` (locked).

    A new description (dtype, shape or flags) goes into a fresh entry that
    replaces the old one in the hash table, so no entry a key names is ever
    rewritten in place.
    """
    seq, fresh = _prepare(a, e, parts, b, value)
    _link(a, i, e, parts, b, value, seq, fresh)


def _prepare(a: _arena.Arena, e: int, parts: Parts, b: int, value: Value) -> tuple[int, int]:
    """First half of an install: (its sequence number, the fresh entry written, or -1).

    Invariant kept: the fresh entry is taken and written before the install
    frees any entry, and so are those of every install of the same section
    (:func:`commit` prepares them all before it links any): an entry freed
    in a section and taken again in it would be rewritten without a journal
    (``fill_entry``), and a rollback would give its old key a clobbered
    record.
    """
    nbytes, _, dt, shape, flags = value
    seq = a.h[_H_SEQ] + 1
    a.set(_H_SEQ, seq)
    if e >= 0 and _same_description(a, e, dt, shape, flags):
        return seq, -1  # the value changes in place of the old one
    fresh = a.new_entry()
    a.fill_entry(fresh, parts[0], (b, seq, nbytes, dt, shape, flags))
    return seq, fresh


def _link(
    a: _arena.Arena,
    i: int,
    e: int,
    parts: Parts,
    b: int,
    value: Value,
    seq: int,
    fresh: int,
) -> None:
    """Second half of an install: the key (slot ``i``, entry ``e`` from find) names ``b``."""
    nbytes, dtype, dt, shape, flags = value
    old = a.eq[e * _EQ + _E_BLOCK] if e >= 0 else -1
    if fresh < 0:
        a.write_value(e, b, seq, nbytes)
    else:
        if e >= 0:
            a.replace(i, parts[2], fresh, e)  # frees e
            a.meta.pop(e, None)
        else:
            a.insert(i, parts[2], fresh)
        a.meta[fresh] = _meta(seq, dtype, shape, flags, dt)
    _swap(a, old, b)


def _same_description(
    a: _arena.Arena, e: int, dt: bytes, shape: tuple[int, ...], flags: int
) -> bool:
    meta = a.meta.get(e)
    if meta is not None and meta[0] == a.eq[e * _EQ + _E_MSEQ]:
        return meta[2] == shape and meta[5] == flags and meta[6] == dt
    return a.read_entry(e) == (dt, shape, flags)


def _swap(a: _arena.Arena, old: int, b: int) -> None:
    if b >= 0:
        a.mark_live(b)
    if old >= 0:
        a.retire(old)


# -- taking blocks ------------------------------------------------------------------


def abandon(a: _arena.Arena, b: int) -> None:
    """Free a block this process took but did not install (takes the lock)."""
    try:
        with a.locked:
            k = b * ix.BLK_FIELDS
            if a.bq[k + ix.B_STATE] == ix.WRITING and a.bq[k + ix.B_OWNER] == a.slot:
                a.retire(b)  # freed now, or when an array of it that we handed out dies
    except StoreClosedError:
        return  # the owner closed the store: the block went with it


def take(a: _arena.Arena, cls: int, timeout: float | None, into: list[int]) -> int:
    """A block of class ``cls`` for this process to fill, waiting up to ``timeout`` s for room.

    With no room (``max_bytes`` reached, or the file system full) it tries
    again, less and less often, until other processes free enough or the
    time is up (``None``: no limit); ``0`` fails at once. A value that can
    never fit under ``max_bytes`` fails at once too.

    Invariant kept: the block is appended to ``into`` as it becomes this
    process's (in the same C call, or right after the section that took
    it), so a caller whose ``try`` began before the call gives it back
    (:func:`abandon`) whatever is raised, a signal handler's exception
    included. (In Python a section's last bytecode stays open: a block kept
    until the process ends, never one given back twice.)
    """
    fast = a.fast
    if fast is not None and a.slot >= 0:  # a free block at hand: taken in C
        b = fast.take(a, cls, into)
        if b >= 0:
            return b
    try:
        return grow(a, cls, into)
    except ShmFullError:
        limit = a.h[ix.H_MAX_BYTES] if a.spill_dir is None else 0
        if timeout == 0 or (limit and ix.segment_shape(cls)[1] > limit):
            raise
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.0005
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return grow(a, cls, into)  # the last try raises ShmFullError if still full
        time.sleep(delay if deadline is None else min(delay, deadline - now))
        delay = min(2 * delay, 0.05)
        try:
            return grow(a, cls, into)
        except ShmFullError:
            continue


def grow(a: _arena.Arena, cls: int, into: list[int]) -> int:
    """Take a block of class ``cls``, creating a segment if need be (takes the lock).

    Three steps, each safe to die after: a locked section records the
    new segment as being created by this process; its file is created
    and backed without the lock; a second section makes it live. A
    process killed in between leaves a reservation that the reaper
    drops, unlinking the file. The block goes into ``into`` (see :func:`take`).
    """
    reserved: tuple[int, int, list[int]] | None = None
    with a.locked:
        a.my_slot()
        b = a.pop_free(cls)
        if b < 0:
            # New memory is needed. Looking at other processes costs a read of
            # /proc per process, so it is done here, not for every block taken
            # (benchmarks/pipeline.py: a third of a warm create_array).
            if not ix.is_alive(a.owner_pid, a.h[ix.H_START]):
                # Nobody would remove a new segment but `python -m polystore gc`.
                raise StorageError(
                    f"the owner (pid {a.owner_pid}) of shared array store {a.name!r} "
                    "died; the store takes no more memory"
                )
            a.reap()  # the pins and blocks of dead processes may hold what we need
            b = a.pop_free(cls)
            if b < 0:
                reserved = a.reserve_segment(cls)
    if reserved is None:
        into.append(b)
        return b
    s, gen, descs = reserved
    path = a.seg_file(s, gen)
    try:
        if _faults.kill_at:
            _faults.step()
        mm = a.create_segment_file(s, gen, ix.segment_shape(cls)[1])
        if _faults.kill_at:
            _faults.step()
        with a.locked:
            a.set_seg(s, ix.S_STATE, ix.SEG_LIVE)
            a.set_seg(s, ix.S_USED, 1)
            a.set_block(descs[0], ix.B_STATE, ix.WRITING)
            for d in descs[1:]:
                a.push_free(d)
    except BaseException:
        if _abandon_reservation(a, s, gen, path):
            into.append(descs[0])  # live after all: the caller gives its block back
        raise
    into.append(descs[0])
    a.rw_maps[s] = (gen, mm)
    return descs[0]


def _abandon_reservation(a: _arena.Arena, s: int, gen: int, path: str) -> bool:
    """Drop segment ``s``'s reservation and its file; ``True`` if it was made live meanwhile."""
    live = False
    try:
        with a.locked:
            k = s * ix.SEG_FIELDS
            if a.sq[k + ix.S_GEN] == gen:
                if a.sq[k + ix.S_STATE] == ix.SEG_CREATING:
                    a.drop_reservation(s)
                # An exception (a signal handler's) after the section that made
                # it live committed: its file is the store's now, not ours to remove.
                live = a.sq[k + ix.S_STATE] == ix.SEG_LIVE
    except StoreClosedError:
        pass  # the owner closed the store and took the reservation with it
    if not live:
        unlink_quietly(path)
    return live
