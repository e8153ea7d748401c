"""One process's view of a shared-array store: mappings, the lock, pins, lifetime.

An :class:`Arena` maps the control segment of a store (layout in
:mod:`polystore._shm.layout`, allocation in :mod:`polystore._shm.alloc`) and
the data segments it touches, and keeps them mapped for reuse: a steady-state
put copies into memory that is already mapped and faulted in, and a
steady-state get only builds a view. All handles of one store in a process
share its arena.

Concurrency: every change to the control segment happens under ``flock`` on
the control file (the kernel drops it when its holder dies) plus a thread lock
for the threads of one process, in a locked section that is a transaction:
``with arena.locked:`` commits on success and rolls back on an exception, and
the next holder rolls back the section of a holder that died (see
:mod:`polystore._shm.tables`). Large values are copied outside the lock into
a block no one else can see until the put installs it.

Blocks are recycled, never unmapped under a reader: a block replaced or
deleted while views of it exist is *retired* and returns to its free list only
when the last view dies. Each process counts its views per block in its own
row of the pin table, so the pins of a process that died can be taken back.
"""

from __future__ import annotations

import fcntl
import functools
import mmap
import os
import threading
import weakref
from typing import Any, Literal

import numpy as np

from ..exceptions import StorageError, StoreClosedError
from . import layout as ix
from .alloc import Allocator, unlink_quietly
from .fast import Section as _CSection
from .fast import hold as _hold
from .fast import let_go as _let_go_c
from .fast import make_ctl

__all__ = ["Arena", "Meta", "lookup", "remember"]

#: (meta seq, dtype, shape, element count, order, flags, dtype text) of a stored value
Meta = tuple[int, np.dtype[Any], tuple[int, ...], int, Literal["C", "F"], int, bytes]

_all_arenas: weakref.WeakSet[Arena] = weakref.WeakSet()
# Bound once: the lock is taken on every call, and these save lookups there.
_flock, _LOCK_EX, _LOCK_UN, _LOCK_NB = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN, fcntl.LOCK_NB
_get_ident = threading.get_ident
_H_CLOSED, _H_EPOCH, _H_WSEQ, _H_LOG_LEN = ix.H_CLOSED, ix.H_EPOCH, ix.H_WSEQ, ix.H_LOG_LEN
_fence_lock = threading.Lock()
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)


def fence() -> None:
    """A full memory barrier (taking and dropping a lock runs a locked instruction)."""
    with _fence_lock:  # (an exception from a signal handler cannot leave it taken)
        pass


def _py_let_go(arena: Arena) -> None:
    """Undo a partial :meth:`Arena.acquire`: drop the flock if taken, then the thread lock.

    Each step runs even if a signal handler raises in the one before (but one
    could raise before the first: C's ``let_go`` has no such gap).
    """
    try:
        arena._holder = None
    finally:
        try:
            if arena._fd >= 0:
                _flock(arena._fd, _LOCK_UN)  # (not taken: nothing happens)
        finally:
            arena._lock.release()


#: drops an arena's flock and thread lock (``fast.let_go``, or its Python twin)
_let_go: Any = _py_let_go if _let_go_c is None else _let_go_c


class _Section:
    """``with arena.locked:``: a locked section that commits, or rolls back on an exception.

    Without C; ``fast.Section`` is the same in C, and lets go of the lock
    whatever ``release()`` or ``abort()`` raise, even at their first line.
    """

    __slots__ = ("arena",)

    def __init__(self, arena: Arena) -> None:
        self.arena = arena

    def __enter__(self) -> Arena:
        self.arena.acquire()
        return self.arena

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.arena.release()
        else:
            self.arena.abort()


class Arena(Allocator):
    """The mapped control segment of one store, as seen from this process.

    Attributes:
        owner_pid: pid of the process that created the store.
        name: the store's name.
        dir: the directory of its files.
        locked: ``with arena.locked:`` runs a locked section (a transaction).
        handles: number of open :class:`~polystore.SharedArrayStore` objects using it.
        leave_when_unused: leave the store once no handle and no view remains.
        closed: set once this process no longer uses the store.
    """

    def __init__(
        self, directory: str, owner_pid: int, name: str, fd: int, layout: ix.Layout
    ) -> None:
        self._mm = mmap.mmap(fd, layout.size)
        super().__init__(self._mm, layout)
        self.owner_pid = owner_pid
        self.name = name
        self.dir = directory
        self.spill_dir = ix.spill_dir_of(self.q)
        self.path = ix.ctl_path(directory, owner_pid, name)
        self.locked = _Section(self) if _CSection is None else _CSection(self)
        self.handles = 0
        self.leave_when_unused = False
        self.closed = False
        self._fd = fd
        self._ino = os.fstat(fd).st_ino
        self._lock = threading.Lock()
        self._holder: int | None = None
        self.slot = -1
        self.pin_base = 0
        self._epoch = -1
        self.ro_maps: dict[int, tuple[int, mmap.mmap]] = {}
        self.rw_maps: dict[int, tuple[int, mmap.mmap]] = {}
        self._refs: dict[int, tuple[weakref.ref[Any], int]] = {}
        self._pending: list[int] = []
        #: decoded description of each entry's value, valid while its E_MSEQ matches
        self.meta: dict[int, Meta] = {}
        self.fast = make_ctl(self._whole, layout)
        #: the weak-reference callback of every view (made once: the C read path
        #: takes it); with C, one call no signal handler can cut in two
        self.view_dead: Any = (
            self._view_dead if self.fast is None else functools.partial(self.fast.view_dead, self)
        )
        if self.fast is not None:
            self.fast.bind(
                self.meta, self.ro_maps, self.rw_maps, self._refs, self.view_dead, ix.DTYPES
            )
        _all_arenas.add(self)

    # -- lifetime ---------------------------------------------------------------
    def _after_fork(self, adopted: bool) -> None:
        # The child shares the parent's open file description, hence its
        # flock: it needs a description of its own. It keeps the views it
        # inherited, with the row it pinned them in, if adopt_views() ran.
        self._lock = threading.Lock()
        self._holder = None
        self._pending.clear()  # deferred unpins of the parent's row
        if not adopted:
            self.slot = -1
            self._refs.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _reopen(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise self.closed_error() from None
        if os.fstat(fd).st_ino != self._ino:
            os.close(fd)
            raise self.closed_error()
        self._fd = fd

    def closed_error(self) -> StoreClosedError:
        """The error for any use of the store after it was closed."""
        return StoreClosedError(f"shared array store {self.name!r} is closed")

    def shutdown(self) -> None:
        """Stop using the store in this process (views handed out stay valid)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.ro_maps.clear()
            self.rw_maps.clear()
            self._refs.clear()
            self._pending.clear()
            self.release_views()
            try:
                self._mm.close()
            except BufferError:
                # A numpy view of a table outlived us (in a traceback's frame,
                # say): the mapping goes when the last such view does.
                pass
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        _forget(self)

    def leave(self) -> None:
        """Give back this process's slot and pins, then shut down."""
        if self.closed:
            return
        if self.slot >= 0:
            try:
                with self.locked:
                    self.reclaim(self.slot)
                    self.slot = -1
            except StoreClosedError:
                pass  # the owner closed the store: nothing left to give back
        self.shutdown()

    def destroy(self) -> None:
        """Owner only: mark the store closed for everyone and unlink all its files."""
        if self.closed:
            return
        try:
            with self.locked:
                self.set(ix.H_CLOSED, 1)
        except StoreClosedError:
            pass  # closed already; still make sure no file remains
        remove_files(self.dir, self.owner_pid, self.name, self.spill_dir)
        _created.pop((self.dir, self.name), None)
        self.shutdown()

    def drop_handle(self, explicit: bool) -> None:
        """One handle fewer.

        A handle that is merely garbage collected (say, a store unpickled for
        one task of a pool) keeps the arena for the next one, mappings and
        all. After an explicit close of the last handle the process leaves the
        store as soon as no view of it remains.
        """
        self.handles -= 1
        if explicit:
            self.leave_when_unused = True
        if self.handles <= 0 and self.leave_when_unused and not self._refs:
            self.leave()

    # -- locking ---------------------------------------------------------------------
    def acquire(self, blocking: bool = True) -> bool:
        """Take the store lock; raise :class:`StoreClosedError` if the store is closed.

        With ``blocking=False``, return ``False`` instead of waiting.
        """
        # Invariant kept: an exception at any point (a signal handler can
        # raise between any two bytecodes: Ctrl-C) leaves neither the thread
        # lock nor the flock taken, or the store would be locked for good in
        # every process. The thread lock's owner is recorded in the same C
        # call that takes it (fast.hold), so the handler below knows whether
        # to let go; the flock is dropped whenever the thread lock was ours.
        # A write counter left odd reads as a dead holder's, which the next
        # holder handles. (Without C, one bytecode boundary stays open.)
        me = _get_ident()
        if self._holder == me:  # (it would wait for itself for ever)
            raise RuntimeError(f"a locked section of store {self.name!r} is open in this thread")
        try:
            if _hold is not None:
                if not _hold(self, blocking):
                    return False
            elif self._lock.acquire(blocking):
                self._holder = me
            else:
                return False
            # From here a view dying in this thread (the garbage collector
            # can run anywhere) defers its unpin instead of waiting for the
            # thread lock we hold.
            if self._fd < 0 or self.closed:
                if self.closed:
                    raise self.closed_error()
                self._reopen()
            try:
                _flock(self._fd, _LOCK_EX if blocking else _LOCK_EX | _LOCK_NB)
            except BlockingIOError:
                _let_go(self)
                return False
            q = self.q
            # Tell lock-free readers a writer is in: odd, never a value seen before.
            seq = q[_H_WSEQ]
            q[_H_WSEQ] = seq + 2 if seq & 1 else seq + 1  # odd already: its holder died
            fence()  # the pins read from here on include every reader that missed it
            if q[_H_LOG_LEN] or q[ix.H_UNLINK_N]:
                self.recover()
            if q[_H_CLOSED] or q[_H_EPOCH] != self._epoch:
                if q[_H_CLOSED]:
                    self._unlock()
                    raise self.closed_error()
                self._prune()
            return True
        except BaseException:
            if self._holder == me:
                _let_go(self)
            raise

    def recover(self) -> None:
        """Finish what a lock holder that died left: undo its section, redo its unlinks (held)."""
        if self.rollback():
            # Our cached descriptions may name entries of the undone section.
            self.meta.clear()
        self.unlink_dropped()

    def release(self) -> None:
        """Commit the section, evict idle memory beyond the cache, and release the lock."""
        try:
            self.commit()
            h = self.h
            if self.spill_idle:  # disk space is given back at once, never cached
                self.spill_idle = False
                self.evict_idle(h[ix.H_IDLE], spilled_only=True)
            if h[ix.H_IDLE] > h[ix.H_CACHE_BYTES]:
                self.evict_idle(h[ix.H_IDLE] - h[ix.H_CACHE_BYTES])
            self.unpin_pending()
        finally:
            self._unlock()

    def abort(self) -> None:
        """Roll the section back and release the lock (after an exception in it)."""
        self.spill_idle = False
        try:
            if self.rollback():
                self.meta.clear()
            self.unpin_pending()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        # The locks go even if a signal handler raises here (see acquire).
        try:
            self.q[_H_WSEQ] += 1
        finally:
            _let_go(self)

    def _prune(self) -> None:
        # Some process unlinked segments: drop our mappings of them so their
        # memory can return to the system (live views keep theirs mapped).
        self._epoch = self.h[ix.H_EPOCH]
        sq = self.sq
        for cache in (self.ro_maps, self.rw_maps):
            for s, (gen, _) in list(cache.items()):
                k = s * ix.SEG_FIELDS
                if sq[k + ix.S_STATE] != ix.SEG_LIVE or sq[k + ix.S_GEN] != gen:
                    del cache[s]

    # -- mappings -------------------------------------------------------------------------
    def map_segment(self, s: int, gen: int, writable: bool, populate: bool = False) -> mmap.mmap:
        """This process's mapping of a data segment (cached)."""
        cache = self.rw_maps if writable else self.ro_maps
        item = cache.get(s)
        if item is not None and item[0] == gen:
            return item[1]
        path = self.seg_file(s, gen)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise self.closed_error() from None
        try:
            if writable:
                # The pages exist (their creator populated them): mapping them
                # all at once costs a third of populating for writing, and far
                # less than one fault per page; the mapping is kept for the
                # next puts.
                flags = mmap.MAP_SHARED | _MAP_POPULATE
                mm = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                # Lazily: a get stays O(1) whatever the size of the value.
                flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
                mm = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        cache[s] = (gen, mm)
        return mm

    def map_all(self) -> int:
        """Map every live segment both ways with its page tables filled; return its bytes."""
        with self.locked:
            segs = self.seg_np
            rows = np.flatnonzero(segs[:, ix.S_STATE] == ix.SEG_LIVE)
            live = segs[rows][:, [ix.S_GEN, ix.S_SIZE]].tolist()
        total = 0
        for s, (gen, size) in zip(rows.tolist(), live, strict=True):
            try:
                self.map_segment(s, gen, True)
                self.map_segment(s, gen, False, populate=True)
            except StoreClosedError:
                continue  # unlinked since we looked: nothing to map
            total += size
        return total

    def block_location(self, b: int) -> tuple[int, int, int]:
        """(segment, generation, offset) of a block pinned or owned by this process."""
        bq = self.bq
        s = bq[b * ix.BLK_FIELDS + ix.B_SEG]
        return s, self.sq[s * ix.SEG_FIELDS + ix.S_GEN], bq[b * ix.BLK_FIELDS + ix.B_OFF]

    # -- processes and pins ---------------------------------------------------------------
    def my_slot(self) -> int:
        """This process's row in the process table, claimed on first use (locked)."""
        if self.slot >= 0:
            return self.slot
        free = np.flatnonzero(self.proc_np[:, ix.P_PID] == 0)
        if not len(free):
            self.reap()
            free = np.flatnonzero(self.proc_np[:, ix.P_PID] == 0)
            if not len(free):
                raise StorageError(
                    f"shared array store {self.name!r} is used by {self.layout.max_procs} "
                    "processes already; create it with a larger max_procs"
                )
        p = int(free[0])
        pid, start = ix.my_identity()
        self.back_row(p)  # before anything may pin in it
        k = self.P0 + p * ix.PROC_FIELDS
        self.set(k + ix.P_START, start)
        self.set(k + ix.P_PID, pid)
        if self.h[ix.H_PROC_HW] <= p:
            self.set(ix.H_PROC_HW, p + 1)
        # Committed at once: it is called first in a section, and self.slot
        # must never name a row that a rollback gives back.
        self.commit()
        self.slot = p
        self.pin_base = p * self.layout.max_blocks
        _register_exit_hook()
        return p

    def adopt_views(self) -> None:
        """In a forked child: pin the blocks of the inherited views in a row of its own.

        Runs while the parent holds the store lock for the child, through the
        open file description they now share (see ``_before_fork``).
        """
        counts: dict[int, int] = {}
        for _, b in self._refs.values():
            counts[b] = counts.get(b, 0) + 1
        self.slot = -1
        self.my_slot()
        for b, n in counts.items():
            self.pin_add(self.pin_base + b, n)

    def _unpin(self, b: int) -> None:
        # Only this process writes its row (pinning is inlined in the read
        # path); the thread lock, or the store lock, which includes it, keeps
        # its threads apart. A retired block whose last view this was is
        # freed by the next sweep.
        if self.slot >= 0:
            self.pin_add(self.pin_base + b, -1)

    def pin_add(self, i: int, delta: int) -> None:
        """Change count ``i`` of this process's row of the pin table (never below 0).

        The C read path pins without the thread lock, so with it every change
        to the row is one atomic call (:meth:`polystore._shm._fastpath.Ctl.pin_add`);
        without it, the callers hold the thread lock.
        """
        if self.fast is not None:
            self.fast.pin_add(i, delta)
        else:
            self.pins[i] = max(0, self.pins[i] + delta)

    def unpin_pending(self) -> None:
        """Drop the pins of views that died while this thread held the lock (held)."""
        while self._pending:
            self._unpin(self._pending.pop())

    def unpin(self, b: int) -> None:
        """Drop one view of block ``b`` (takes the thread lock only)."""
        with self._lock:
            self._unpin(b)

    def hold_view(self, view_base: Any, b: int) -> None:
        """Pin block ``b`` for a view whose base is ``view_base``, until it dies (:meth:`track`).

        With C, in one call (``Ctl.pin_tracked``): an exception from a signal
        handler between the pin and the watch would leave the block pinned
        for the life of the process.
        """
        if self.fast is not None:
            self.fast.pin_tracked(view_base, self.pin_base + b, b)
        else:
            self.pin_add(self.pin_base + b, 1)
            self.track(view_base, b)

    def track(self, view_base: Any, b: int) -> None:
        """Unpin block ``b`` when ``view_base``, which every view of it keeps alive, dies."""
        ref = weakref.ref(view_base, self.view_dead)
        self._refs[id(ref)] = (ref, b)

    def _view_dead(self, ref: weakref.ref[Any]) -> None:
        # Without C, and for what C's view_dead leaves to it (no row yet, the
        # store closed). C's unpins at once, with no lock: a dead view's pin
        # can go at any time, even inside a section of this process.
        item = self._refs.pop(id(ref), None)
        if item is None or self.closed:
            return
        b = item[1]
        me = _get_ident()
        if self._holder == me:
            # The garbage collector ran inside one of our own critical
            # sections: the unpin happens when that section releases the lock.
            self._pending.append(b)
            return
        # The thread lock of this store may be held by a thread of ours that
        # waits for the store lock; waiting for it while holding another
        # store's lock could then deadlock with a process doing the reverse:
        # in that case only try, and defer on failure.
        blocking = not any(other._holder == me for other in list(_arenas.values()))
        if not self._lock.acquire(blocking):
            self._pending.append(b)
            return
        try:
            self._unpin(b)
        finally:
            self._lock.release()
        if self.handles <= 0 and self.leave_when_unused and not self._refs:
            self.leave()


# -- process-wide bookkeeping ---------------------------------------------------------------

#: the arena of each store this process uses, shared by all its handles
_arenas: dict[tuple[str, int, str], Arena] = {}
_exit_hook_pid = -1


def _forget(arena: Arena) -> None:
    key = (arena.dir, arena.owner_pid, arena.name)
    if _arenas.get(key) is arena:
        del _arenas[key]


#: the stores this process created and has not removed: (directory, name) ->
#: spill directory. Invariant kept: a store is noted before its control file
#: is made and forgotten only once destroy() has unlinked all its files, so
#: whatever an exception (a signal handler's too) left between the two,
#: creation or removal cut short, goes when the process ends (_leave_all).
_created: dict[tuple[str, str], str | None] = {}


def note_created(directory: str, name: str, spill_dir: str | None) -> None:
    """Note a store this process is about to create (see ``_created``)."""
    _register_exit_hook()
    _created[(directory, name)] = spill_dir


def forget_created(directory: str, name: str) -> None:
    """Forget a store noted by :func:`note_created` that this process did not create."""
    _created.pop((directory, name), None)


def remove_files(directory: str, owner_pid: int, name: str, spill_dir: str | None) -> None:
    """Unlink every file of a store: its data segments (spilled ones too), then its control file."""
    prefix = f"{ix.PREFIX}{owner_pid}-{name}."
    paths = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)]
    if spill_dir is not None and os.path.isdir(spill_dir):
        paths += [
            os.path.join(spill_dir, n)
            for n in os.listdir(spill_dir)
            if n.startswith(prefix) and not n.endswith(".ctl")
        ]
    # Data segments first: a control file whose data is gone would look
    # like the remains of a crashed owner to `python -m polystore gc`.
    for path in sorted(paths, key=lambda n: n.endswith(".ctl")):
        unlink_quietly(path)


def _leave_all() -> None:
    for arena in list(_arenas.values()):
        arena.leave()
    me = os.getpid()  # (a forked child inherits its parent's notes, not its stores)
    for (directory, name), spill_dir in list(_created.items()):
        try:
            remove_files(directory, me, name, spill_dir)
        except OSError:
            pass  # (the directory went away)


def _register_exit_hook() -> None:
    # multiprocessing runs its finalizers at interpreter exit and also when a
    # fork or forkserver child ends with os._exit(), where atexit does not run.
    global _exit_hook_pid
    if _exit_hook_pid == os.getpid():
        return
    from multiprocessing import util

    util.Finalize(None, _leave_all, exitpriority=0)
    _exit_hook_pid = os.getpid()


def lookup(directory: str, owner_pid: int, name: str) -> Arena | None:
    """The open arena of a store in this process, if any."""
    arena = _arenas.get((directory, owner_pid, name))
    return None if arena is None or arena.closed else arena


def remember(arena: Arena) -> Arena:
    """Make ``arena`` the one this process uses for its store."""
    _arenas[(arena.dir, arena.owner_pid, arena.name)] = arena
    return arena
