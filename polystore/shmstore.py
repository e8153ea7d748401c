"""Zero-copy hand-off of numpy arrays between processes, through shared memory.

.. code-block:: python

    with SharedArrayStore() as store:          # this process owns the store
        store.put("frame", image)               # one copy into shared memory
        pool.submit(work, store, "frame")       # pickles to its name only

    def work(store, key):
        view = store.get(key)                   # read-only view, no copy
        ...

A :class:`SharedArrayStore` keeps arrays in pooled shared-memory segments that
stay mapped and are recycled, so that a steady-state ``put`` costs one
``memcpy`` into memory that is already faulted in, :meth:`~SharedArrayStore.create`
none at all, and a ``get`` a lookup plus building a view. The key index lives
in shared memory too, so a ``put`` in any process is visible to a ``get`` in
every other one with no server process in between. The engine is the
:mod:`polystore._shm` subpackage; this module is its public face.

Guarantees:

* A ``put`` is atomic: readers see the old value or the new one, never a mix,
  also when the writer is killed at any instruction (the next process to
  take the store's lock rolls its unfinished change back). So is an
  :meth:`~SharedArrayStore.update` of several keys: all old or all new.
* A view stays valid and unchanged after its key is overwritten or deleted,
  and after the store is closed; its memory is recycled when the last view of
  it dies, in whichever process that is.
* Only the owner (the process that created the store) removes it: at
  :meth:`~SharedArrayStore.close`, when the owning object is garbage
  collected, and at interpreter exit. Workers that die, even by ``SIGKILL``,
  leak nothing the owner does not remove; if the owner itself is killed,
  ``python -m polystore gc`` removes what it left.
* Every page is reserved before it is touched, and nothing is written past
  the free space of the store's directory or its ``max_bytes``: such a put
  raises :class:`~polystore.ShmFullError` (or waits, or spills, if asked to).

Linux only (it needs a tmpfs such as ``/dev/shm``). Arrays keep C or Fortran
order; any other layout is stored in C order.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from ._args import check_timeout, positive
from ._shm import arena as _shm_arena
from ._shm import layout as ix
from ._shm import open as _shm_open
from ._shm import write as _shm_write
from ._shm.keys import key_parts, staged
from ._shm.read import (
    LOCK_FREE_GET,
    RETRY,
    contains_optimistic,
    get_locked,
    get_optimistic,
)
from .exceptions import ShmFullError, StorageError, StoreClosedError, StoreNotFoundError
from .formats import ArraySpec, array_spec

__all__ = ["EntryInfo", "SharedArrayStore"]

#: memory kept in idle segments for reuse before they are unlinked
DEFAULT_CACHE_BYTES = 1 << 30


class EntryInfo(NamedTuple):
    """What a key holds, read from the index without touching the data."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    nbytes: int
    kind: Literal["array", "bytes"]
    order: Literal["C", "F"]


def _reattach(directory: str, owner_pid: int, name: str) -> SharedArrayStore:
    return SharedArrayStore._bind(_shm_open.open_store(directory, owner_pid, name), owner=False)


def _close_owned(arena: _shm_arena.Arena) -> None:
    arena.destroy()


class SharedArrayStore:
    """A key -> numpy array store in shared memory, shared by any number of processes.

    ``SharedArrayStore()`` creates a store owned by the calling process; pass
    the object (it pickles to its name) or its :attr:`name` to other processes,
    which then :meth:`attach` to it.

    Args:
        name: a name for the store (1 to 64 characters from ``A-Za-z0-9_-``);
            random by default.
        max_bytes: cap on the shared memory the store maps, idle reuse cache
            included; by default only the free space of ``/dev/shm`` limits it.
        cache_bytes: idle segments kept mapped for reuse; beyond this they are
            unlinked, least recently used first.
        max_keys: capacity of the key index.
        max_procs: how many processes may use the store at the same time.
        max_blocks: capacity of the block table (defaults to ``2 * max_keys``;
            small arrays take one block each, 64 share one segment).
        max_segs: capacity of the segment table.
        directory: where the store's files live: ``/dev/shm`` unless the
            environment variable ``POLYSTORE_SHM_DIR`` names another
            directory. Any directory of a memory-backed (tmpfs) or local file
            system works; other processes attach with the same directory.
        spill_dir: a directory on disk for values that do not fit: when
            ``max_bytes`` is reached or the store's directory is full, a new
            segment is created there instead, as a file-backed shared mapping
            (readers still get zero-copy views, at the speed of the page
            cache and the disk). Removed with the store. ``None``: a value
            that does not fit raises :class:`ShmFullError`.

    Raises:
        StorageError: the name is taken.
        NotADirectoryError: ``directory`` is not a directory.
        ShmFullError: no room for the store's tables.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        max_bytes: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_keys: int = 65536,
        max_procs: int = 128,
        max_blocks: int | None = None,
        max_segs: int = 8192,
        directory: str | os.PathLike[str] | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        where = ix.check_dir(directory)
        spill = None if spill_dir is None else ix.check_dir(spill_dir)
        if spill is not None and len(spill.encode("utf-8", "surrogateescape")) > (
            ix.MAX_SPILL_DIR_BYTES
        ):
            raise ValueError(f"spill_dir: a path of at most {ix.MAX_SPILL_DIR_BYTES} bytes")
        name = ix.new_store_name() if name is None else ix.check_store_name(name)
        config = {
            "max_bytes": 0 if max_bytes is None else positive(max_bytes, "max_bytes"),
            "cache_bytes": positive(cache_bytes, "cache_bytes") if cache_bytes else 0,
            "max_keys": positive(max_keys, "max_keys"),
            "max_procs": positive(max_procs, "max_procs"),
            "max_blocks": positive(max_blocks or 2 * max_keys, "max_blocks"),
            "max_segs": positive(max_segs, "max_segs"),
        }
        self._init(_shm_open.create_store(where, name, config, spill), owner=True)

    @classmethod
    def attach(
        cls, name: str, *, directory: str | os.PathLike[str] | None = None
    ) -> SharedArrayStore:
        """Attach to the store called ``name``, created by another process (or this one).

        ``directory`` is the one the store was created in (same default).

        Raises:
            StoreNotFoundError: no such store, or its owner died (``python
                -m polystore gc`` removes what it left).
            StorageError: it belongs to another user.
            StoreClosedError: its owner closed it.
        """
        ix.check_store_name(name)
        where = ix.check_dir(directory)
        owners, others = _shm_open.owners_of(where, name)
        if not owners:
            if others:
                raise StorageError(
                    f"the shared array store named {name!r} in {where} belongs to another "
                    f"user (owner pid {others[0]}), not to this one"
                )
            raise StoreNotFoundError(f"no shared array store named {name!r} in {where}")
        for pid in owners[:-1]:
            try:
                return cls._bind(_shm_open.open_store(where, pid, name), owner=False)
            except StorageError:
                # The remains of a dead owner, or a file that is no store of
                # ours: a live one may follow.
                continue
        return cls._bind(_shm_open.open_store(where, owners[-1], name), owner=False)

    @classmethod
    def _bind(cls, arena: _shm_arena.Arena, owner: bool) -> SharedArrayStore:
        self = cls.__new__(cls)
        self._init(arena, owner)
        return self

    def _init(self, arena: _shm_arena.Arena, owner: bool) -> None:
        self._arena = arena
        self._name = arena.name
        self._owner_pid = arena.owner_pid
        self._owns = owner
        self._closed = False
        arena.handles += 1
        arena.leave_when_unused = False
        self._finalizer: Any
        if owner:
            from multiprocessing import util

            # Unlike weakref.finalize, this also runs when a fork/forkserver
            # child that created a store ends with os._exit().
            self._finalizer = util.Finalize(self, _close_owned, (arena,), exitpriority=10)
        else:
            self._finalizer = weakref.finalize(self, arena.drop_handle, False)
            self._finalizer.atexit = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reattach, (self._arena.dir, self._owner_pid, self._name))

    # -- properties ------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The store's name, which :meth:`attach` takes."""
        return self._name

    @property
    def spill_dir(self) -> str | None:
        """The directory that takes values which do not fit in shared memory, if any."""
        return self._arena.spill_dir

    @property
    def directory(self) -> str:
        """The directory that holds the store's files."""
        return self._arena.dir

    @property
    def is_owner(self) -> bool:
        """Whether this object created the store (in this process) and still has it open."""
        return self._owns and not self._closed and os.getpid() == self._owner_pid

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this object or the store is gone."""
        return self._closed or self._arena.closed

    def _live(self) -> _shm_arena.Arena:
        if self._closed:
            raise StoreClosedError(f"shared array store {self._name!r} is closed")
        return self._arena

    # -- writing ---------------------------------------------------------------------
    def put(
        self, key: str, array: Any, *, overwrite: bool = True, timeout: float | None = 0
    ) -> None:
        """Store a copy of ``array`` under ``key``, atomically replacing any old value.

        Views of the old value that readers hold stay valid and unchanged.
        ``timeout`` is how long to wait, in seconds, for other processes to
        free room when there is none (``None``: as long as it takes); by
        default a full store fails at once.

        Raises:
            TypeError: ``key`` is not a ``str``.
            ValueError: ``key`` is empty, holds NUL or is over 255 bytes of UTF-8.
            NotShareableError: an object array (it holds pointers into this process).
            FileExistsError: ``overwrite=False`` and ``key`` exists.
            ShmFullError: not enough room in the store's directory or under
                ``max_bytes`` (within ``timeout``); nothing was written.
        """
        arr = array if type(array) is np.ndarray else np.asarray(array)
        a = self._arena
        # the steady state in C: a key seen before, same dtype and shape, a free
        # block ready; False: nothing done, the Python path decides
        if a.fast is not None and overwrite and not self._closed and a.fast.put_small(a, key, arr):
            return
        self._put(key, arr, 0, overwrite, check_timeout(timeout))

    def create(
        self,
        key: str,
        shape: int | Sequence[int],
        dtype: npt.DTypeLike = float,
        *,
        order: Literal["C", "F"] = "C",
        overwrite: bool = True,
        timeout: float | None = 0,
    ) -> contextlib.AbstractContextManager[np.ndarray[Any, Any]]:
        """Write a new value in place: a context manager that yields its array.

        .. code-block:: python

            with store.create("frame", (2048, 2048), np.float32) as out:
                np.multiply(image, 2, out=out)      # computed straight into shared memory
            store.get("frame")                      # published on exit, no copy made

        The array lives in the store's shared memory. Nobody sees the key's
        new value while the block runs; leaving it publishes the array under
        ``key`` in one atomic step, exactly like :meth:`put` but without the
        copy. An exception inside the block (or the process dying) publishes
        nothing and gives the memory back.

        After the block, the array is read-only: it is the published value,
        which readers see as it is. Views of it made inside the block are
        still writable, and writing through them would change the published
        value under the readers' feet: do not keep them.

        Raises:
            TypeError: ``shape`` is not an int or a sequence of ints, or
                ``dtype`` is not a dtype (:class:`NotShareableError` for
                object dtypes).
            ValueError: a negative size, ``order`` not "C" or "F", or a value
                larger than the store can ever hold.
            FileExistsError: ``overwrite=False`` and ``key`` exists when the
                block starts or when it ends (the first to publish wins).
            ShmFullError: no room within ``timeout`` seconds (as for :meth:`put`).
        """
        return self._create(key, array_spec(shape, dtype, order), overwrite, timeout)

    def _create(
        self,
        key: str,
        spec: ArraySpec,
        overwrite: bool,
        timeout: float | None,
        extra: Callable[[], _shm_write.Related] | None = None,
        translate: Callable[[FileExistsError], BaseException] | None = None,
    ) -> contextlib.AbstractContextManager[np.ndarray[Any, Any]]:
        """:meth:`create` of an array ``spec`` already checked (the backends' way in).

        ``extra``: called when the block ends, it returns the keys that
        change in the same step as the array is published (a file's
        metadata and directories; see :meth:`_related`), which must not
        include ``key`` itself. ``translate``: what to raise instead of a
        ``FileExistsError`` from publishing (a backend's own error).
        """
        parts = key_parts(key)
        dims, dt, order = spec
        if len(dims) > ix.MAX_NDIM:
            raise ValueError(f"shape {dims} has more than {ix.MAX_NDIM} dimensions")
        a = self._live()
        nbytes = math.prod(dims) * dt.itemsize
        limit = (a.spill_dir is None and a.h[ix.H_MAX_BYTES]) or ix.CLASS_SIZES[-1]
        if nbytes > min(limit, ix.CLASS_SIZES[-1]):
            raise ValueError(
                f"an array of shape {dims} and dtype {dt} takes {nbytes} bytes; shared array "
                f"store {self._name!r} holds values of at most {min(limit, ix.CLASS_SIZES[-1])}"
            )
        flags = ix.F_FORTRAN if order == "F" and len(dims) > 1 else 0
        return _shm_write.create(
            a, key, parts, dims, dt, flags, overwrite, check_timeout(timeout), extra, translate
        )

    @staticmethod
    def _related(
        values: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        ensure: Sequence[_shm_write.Parts] = (),
        conflicts: Sequence[tuple[_shm_write.Parts, str]] = (),
    ) -> _shm_write.Related:
        """Keys to change with a value, checked (the backends' way in).

        ``values`` and ``remove`` as :meth:`update` takes them; ``ensure``:
        parts of keys made empty when absent (directory markers);
        ``conflicts``: (parts, name) of keys that must be absent
        (``FileExistsError`` naming the key otherwise).
        """
        puts, removals = staged(values, remove)
        return _shm_write.Related(puts, removals, list(ensure), list(conflicts))

    def _remove_with(self, key: str, companion: str) -> bool:
        """Remove ``key`` and, if present, ``companion`` in one section (the backends' way in).

        ``False``, with nothing changed, if ``key`` is absent. A file's
        delete: the file and its metadata go together, in one step and one
        lock round trip, with no lookup before (the ``delete`` benchmark of
        ``benchmarks/pipeline_breakdown.py``).
        """
        (_, kbz, h), (_, ckbz, ch) = key_parts(key), key_parts(companion)
        a = self._live()
        if a.fast is not None:  # the same section in C, unless it declines (None)
            done = a.fast.remove(a, kbz, h, ckbz, ch)
            if done is not None:
                return done
        with a.locked:
            i, e = a.find(kbz, h)
            if e < 0:
                return False
            _shm_write.remove(a, i, e)
            i, e = a.find(ckbz, ch)
            if e >= 0:
                _shm_write.remove(a, i, e)
        return True

    def _remove_childless(self, key: str, name: str) -> None:
        """Remove ``key`` (a directory marker) if no other key starts with it, in one step.

        Raises:
            OSError: ``ENOTEMPTY`` naming ``name``, when a key starts with it.
        """
        prefix = key_parts(key)
        _shm_write.commit(self._live(), [], [prefix], 0, childless=[(prefix[0], name)])

    def _commit(
        self, related: _shm_write.Related, timeout: float | None = 0, key: str | None = None
    ) -> None:
        """Make ``related`` in one step; ``key``: the key of its one array, for the C put."""
        a = self._arena
        if (
            key is not None
            and len(related.puts) == 1
            and related.puts[0][2] == 0
            and a.fast is not None
            and not self._closed
        ):
            # One array and nothing else to do (no key to remove, make or
            # refuse): in C, which checks that in the same section. The
            # steady state of a file saved again (polystore.shm_backend).
            absent = tuple(related.removals) + tuple(p for p, _ in related.conflicts)
            if a.fast.put_small(a, key, related.puts[0][1], absent, tuple(related.ensure)):
                return
        _shm_write.commit(
            self._live(), related.puts, related.removals, check_timeout(timeout), None,
            related.conflicts, None, related.ensure,
        )  # fmt: skip

    def update(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        remove: Iterable[str] = (),
        timeout: float | None = 0,
    ) -> None:
        """Put every value of ``values`` and remove every key of ``remove``, in one step.

        Other processes see all of the change or none of it, and so does
        everyone else if this process is killed at any point: the next
        process to take the store's lock rolls a half-done change back.
        Arrays are stored as by :meth:`put` (a copy), bytes-like values as by
        :meth:`put_bytes`; keys of ``remove`` that are absent are skipped.
        ``timeout`` is as for :meth:`put`.

        Raises:
            ValueError: a key both in ``values`` and in ``remove``, a bad key,
                or more than 1,024 keys in all (split such an update).
            TypeError: ``remove`` is a single ``str``, or a key is not one.
            NotShareableError: an object array.
            ShmFullError: no room (within ``timeout``); nothing was changed.
        """
        timeout = check_timeout(timeout)
        gone = remove if isinstance(remove, (str, bytes)) else list(remove)  # (str: refused)
        related = self._related(values, gone)
        if related.puts or related.removals:
            self._commit(related, timeout, next(iter(values or {}), None))

    def rename(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        """Give ``src``'s value to ``dst`` in one step, without copying it; ``src`` goes.

        ``dst``'s old value, if any, is replaced as by :meth:`put`. Views of
        either key's value stay valid and unchanged. Renaming a key onto
        itself changes nothing.

        Raises:
            KeyError: ``src`` is not in the store (nothing changed).
            FileExistsError: ``overwrite=False`` and ``dst`` exists.
        """
        source, target = key_parts(src), key_parts(dst)
        a = self._live()
        if src == dst:
            if src not in self:
                raise KeyError(src)
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "key exists", dst)
            return
        conflicts = [] if overwrite else [(target, dst)]
        _shm_write.commit(a, [], [], 0, None, conflicts, [(source, target, src)])

    def _move(self, moves: list[tuple[str, str, bool]], related: _shm_write.Related) -> None:
        """Moves (source, destination, required) and ``related`` in one step (the backends' way in).

        An absent source that is not required removes its destination
        (a file's metadata: none at the source, none at the destination).
        """
        keys = [k for m in moves for k in m[:2]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key is named twice in one step: {sorted(keys)}")
        parts = [
            (key_parts(src), key_parts(dst), src if required else None)
            for src, dst, required in moves
        ]
        _shm_write.commit(
            self._live(), related.puts, related.removals, 0, None, related.conflicts, parts,
            related.ensure,
        )  # fmt: skip

    def put_bytes(
        self, key: str, data: bytes | bytearray | memoryview, *, timeout: float | None = 0
    ) -> None:
        """Store a copy of a bytes-like object under ``key`` (see :meth:`get_bytes`).

        ``timeout`` is as for :meth:`put`.
        """
        arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self._put(key, arr, ix.F_BYTES, True, check_timeout(timeout))

    def _put(
        self,
        key: str,
        arr: np.ndarray[Any, Any],
        flags: int,
        overwrite: bool,
        timeout: float | None = 0,
    ) -> None:
        parts = key_parts(key)
        _shm_write.put(self._live(), self._name, key, parts, arr, flags, overwrite, timeout)

    def delete(self, key: str) -> None:
        """Remove ``key``; views of its value stay valid.

        Raises:
            KeyError: ``key`` is not in the store.
        """
        _, kbz, h = key_parts(key)
        a = self._live()
        done = a.fast.remove(a, kbz, h) if a.fast is not None else None  # None: declined
        if done is None:
            with a.locked:
                i, e = a.find(kbz, h)
                done = e >= 0
                if done:
                    _shm_write.remove(a, i, e)
        if not done:
            raise KeyError(key)

    # -- reading ---------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray[Any, Any]:
        """A read-only view of the array stored under ``key``; no copy is made.

        Raises:
            KeyError: ``key`` is not in the store.
        """
        a = self._arena
        if a.fast is not None and LOCK_FREE_GET and not self._closed:
            # the lock-free read and the view, in C; False: the Python path decides
            view = a.fast.view(a, key)
            if view is not False:
                if view is None:
                    raise KeyError(key)
                return view
        return self._get(key)[0]

    def get_bytes(self, key: str) -> bytes:
        """A copy of the bytes stored under ``key`` by :meth:`put_bytes`.

        Raises:
            KeyError: ``key`` is not in the store.
            TypeError: ``key`` holds an array, not bytes.
        """
        view, flags = self._get(key)
        if not flags & ix.F_BYTES:
            raise TypeError(f"key {key!r} holds an array; use get()")
        return view.tobytes()

    def get_value(self, key: str) -> np.ndarray[Any, Any] | bytes:
        """What ``key`` holds: a read-only view for an array, a copy for bytes.

        One lookup where :meth:`info` followed by :meth:`get` or
        :meth:`get_bytes` would take two.

        Raises:
            KeyError: ``key`` is not in the store.
        """
        view, flags = self._get(key)
        return view.tobytes() if flags & ix.F_BYTES else view

    def _get(self, key: str) -> tuple[np.ndarray[Any, Any], int]:
        """(read-only view, flags) of a key's value: the hot path, kept flat."""
        _, kbz, h = key_parts(key)
        a = self._live()
        if LOCK_FREE_GET and a.slot >= 0:
            fast = a.fast
            if fast is not None:  # the same read and view in C, if the description is cached
                got = fast.get(a, kbz, h)
                if got is None:
                    raise KeyError(key)
                if got is not False:
                    return got
            got = get_optimistic(a, kbz, h)
            if got is None:
                raise KeyError(key)
            if got is not RETRY:
                return got
        got = get_locked(a, kbz, h)
        if got is None:
            raise KeyError(key)
        return got

    def info(self, key: str) -> EntryInfo:
        """Shape, dtype, size and kind of ``key``'s value, without mapping it.

        Raises:
            KeyError: ``key`` is not in the store.
        """
        _, kbz, h = key_parts(key)
        with self._live().locked as a:
            e = a.find(kbz, h)[1]
            if e < 0:
                raise KeyError(key)
            nbytes = a.eq[e * (ix.ENT_SIZE // 8) + ix.E_NBYTES]
            dt, shape, flags = a.read_entry(e)
        return EntryInfo(
            shape,
            ix.decode_dtype(dt),
            nbytes,
            "bytes" if flags & ix.F_BYTES else "array",
            "F" if flags & ix.F_FORTRAN else "C",
        )

    def keys(self) -> list[str]:
        """Every key in the store, sorted."""
        with self._live().locked as a:
            return sorted(a.key_of(e) for e in a.entries())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        a = self._live()
        if LOCK_FREE_GET and a.fast is not None:  # the same lock-free lookup in C
            found = a.fast.contains(key)
            if found is not None:
                return found
        _, kbz, h = key_parts(key)
        if LOCK_FREE_GET:
            found = contains_optimistic(a, kbz, h)
            if found is not RETRY:
                return bool(found)
        with a.locked:
            return a.find(kbz, h)[1] >= 0

    def __len__(self) -> int:
        with self._live().locked as a:
            return a.h[ix.H_NKEYS]

    # -- memory ----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters: keys, segments, mapped bytes, idle (reusable) bytes, limits."""
        with self._live().locked as a:
            live = a.seg_np[:, ix.S_STATE] == ix.SEG_LIVE
            return {
                "keys": a.h[ix.H_NKEYS],
                "segments": int(np.count_nonzero(live)),
                "mapped_bytes": a.h[ix.H_TOTAL],
                "spilled_bytes": a.h[ix.H_SPILLED],
                "idle_bytes": a.h[ix.H_IDLE],
                "max_bytes": a.h[ix.H_MAX_BYTES],
                "cache_bytes": a.h[ix.H_CACHE_BYTES],
                "processes": int(np.count_nonzero(a.proc_np[:, ix.P_PID])),
            }

    def reserve(self, nbytes: int, block_bytes: int) -> int:
        """Create memory for later puts now, so that they find it mapped and faulted in.

        Fresh shared memory costs a page fault per 4 KiB page on first touch,
        several times the cost of copying into it; a pipeline that calls this
        before it starts pays that up front instead of in its first pass.
        The memory waits as idle segments sized for values of up to
        ``block_bytes``, so it is kept only up to ``cache_bytes`` like any
        other idle memory.

        Args:
            nbytes: how much memory to have ready, in all.
            block_bytes: the size of the values that will use it.

        Returns:
            The bytes made ready (``nbytes`` rounded up to whole blocks).

        Raises:
            ValueError: ``nbytes`` exceeds the store's ``cache_bytes``.
            ShmFullError: not enough room; nothing stays reserved.
        """
        positive(nbytes, "nbytes")
        positive(block_bytes, "block_bytes")
        a = self._live()
        if block_bytes > ix.CLASS_SIZES[-1]:
            where = f"shared array store {self._name!r}"
            raise ShmFullError(block_bytes, ix.CLASS_SIZES[-1], where)
        limit = a.h[ix.H_CACHE_BYTES]
        if nbytes > limit:
            raise ValueError(
                f"cannot keep {nbytes} bytes ready: idle memory beyond cache_bytes={limit} "
                "is given back"
            )
        cls = ix.class_of(block_bytes)
        taken: list[int] = []
        try:
            while len(taken) * ix.CLASS_SIZES[cls] < nbytes:
                _shm_write.grow(a, cls, taken)
        finally:
            if taken:
                with a.locked:
                    for n, b in enumerate(taken, 1):
                        a.free(b)
                        if n % 256 == 0:
                            a.commit()  # each block freed is a whole step: keep the journal short
        return len(taken) * ix.CLASS_SIZES[cls]

    def map_all(self) -> int:
        """Map every segment of the store into this process now; return their bytes.

        A process otherwise maps a segment when it first writes or reads a
        value there, and fills the page tables of a read mapping one fault at
        a time. A pool worker that calls this at start-up (which
        ``FileManagerFactory(..., premap=True)`` does) pays for both before its
        first task. Each mapping costs page tables (about 2 MB per GB mapped)
        for as long as the segment lives.
        """
        return self._live().map_all()

    def trim(self) -> int:
        """Unlink every idle segment now instead of keeping it for reuse; return its bytes.

        Blocks whose last view died since are freed first, so their segments
        count as idle too.
        """
        with self._live().locked as a:
            a.sweep_retired()
            return a.evict_idle(a.h[ix.H_IDLE])

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Owner: remove the store and every segment. Others: detach this object.

        Views already handed out stay valid. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns and os.getpid() == self._owner_pid:
            self._finalizer()
            return
        if not self._owns:
            self._finalizer.detach()
        self._arena.drop_handle(explicit=True)

    def __enter__(self) -> SharedArrayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        state = "closed" if self.closed else "open"
        return f"SharedArrayStore({self._name!r}, {role}, {state})"
