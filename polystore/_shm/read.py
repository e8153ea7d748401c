"""The read path of :class:`~polystore.SharedArrayStore`: lookups, pins and views.

A ``get`` takes no store lock where the processor allows it. Every locked
section makes the header's write counter odd on entry (then fences) and even
on exit; a reader notes the counter, looks the key up, pins the block in its
own row of the pin table, fences, and checks that the counter did not move.
If it moved, the reader drops its pin and the caller reads under the lock. Of
a writer and a reader that overlap, at least one sees the other, so a writer
never reuses a block that a successful reader is about to view.
"""

from __future__ import annotations

import platform
from typing import Any, Literal

import numpy as np

from . import arena as _arena
from . import layout as ix

__all__ = [
    "LOCK_FREE_GET",
    "RETRY",
    "contains_optimistic",
    "get_locked",
    "get_optimistic",
    "make_meta",
    "read_meta",
]

_EQ, _BLK, _SEG = ix.ENT_SIZE // 8, ix.BLK_FIELDS, ix.SEG_FIELDS
_E_BLOCK, _E_MSEQ = ix.E_BLOCK, ix.E_MSEQ
_B_SEG, _B_OFF, _S_GEN = ix.B_SEG, ix.B_OFF, ix.S_GEN
_H_WSEQ, _H_CLOSED, _H_EPOCH = ix.H_WSEQ, ix.H_CLOSED, ix.H_EPOCH
#: Lock-free reads need a full barrier between storing a pin and re-reading
#: the write counter; a lock round trip gives one on x86 (any locked
#: instruction does). Elsewhere every get takes the store lock.
LOCK_FREE_GET = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
RETRY = object()  # what the lock-free read returns when a writer got in the way


def make_meta(
    mseq: int, dtype: np.dtype[Any], shape: tuple[int, ...], flags: int, dt: bytes
) -> _arena.Meta:
    """The cached description of a value: see :data:`polystore._arena.Meta`."""
    count = 1
    for extent in shape:
        count *= extent
    order: Literal["C", "F"] = "F" if flags & ix.F_FORTRAN else "C"
    return (mseq, dtype, shape, count, order, flags, dt)


def get_optimistic(a: _arena.Arena, kbz: bytes, h: int) -> Any:
    """A key's value read without the store lock (see the module docstring).

    Returns (read-only view, flags), ``None`` if the key is absent, or
    ``RETRY`` when a writer was busy or got in the way (then the caller
    takes the lock). A seqlock: the write counter was even and unchanged
    around the reads, so they saw no locked section. The view is made
    before the block is pinned, and with C pinned and watched in one call
    (``Ctl.pin_tracked``), so that no exception, a signal handler's
    included, can leave a pin that nothing drops; a view the check then
    rejects unpins as it dies.
    """
    try:
        hdr = a.h
        seq = hdr[_H_WSEQ]
        if seq & 1 or hdr[_H_CLOSED] or hdr[_H_EPOCH] != a._epoch:
            return RETRY
        e = a.find(kbz, h)[1]
        if e < 0:
            return None if hdr[_H_WSEQ] == seq else RETRY
        k = e * _EQ
        b = a.eq[k + _E_BLOCK]
        meta = a.meta.get(e)
        fresh = meta is None or meta[0] != a.eq[k + _E_MSEQ]
        if meta is None or fresh:
            meta = read_meta(a, e)
        view = None if b < 0 else _view(a, meta, b)
    except Exception:  # torn reads can look like anything; the lock sorts it out
        return RETRY
    if view is not None:
        if a.fast is not None:  # pinned and watched in one C call; its atomic add is the barrier
            a.fast.pin_tracked(view.base, a.pin_base + b, b)
        else:
            with a._lock:  # the row's other writers, and the barrier before the check below
                a.pin_add(a.pin_base + b, 1)
            a.track(view.base, b)  # (without C, a handler raising just before leaves the pin)
    if hdr[_H_WSEQ] != seq:
        return RETRY
    if fresh:
        a.meta[e] = meta
    return _shaped(view, meta), meta[5]


def get_locked(a: _arena.Arena, kbz: bytes, h: int) -> Any:
    """What :func:`get_optimistic` finds, under the lock: (view, flags), or None if absent."""
    with a.locked:
        e = a.find(kbz, h)[1]
        if e < 0:
            return None
        k = e * _EQ
        b = a.eq[k + _E_BLOCK]
        meta = a.meta.get(e)
        if meta is None or meta[0] != a.eq[k + _E_MSEQ]:
            meta = read_meta(a, e)
            a.meta[e] = meta
        view = None
        if b >= 0:
            if a.slot < 0:
                a.my_slot()
            view = _view(a, meta, b)
            a.hold_view(view.base, b)  # pin and watch: only this process writes its row
    return _shaped(view, meta), meta[5]


def contains_optimistic(a: _arena.Arena, kbz: bytes, h: int) -> Any:
    """Whether a key is in the store, read without the lock: ``True``, ``False`` or ``RETRY``.

    The same seqlock as :func:`get_optimistic`, with nothing to pin: the
    answer stands if the write counter was even and unchanged around the
    lookup. A pipeline asks this several times per file it writes (is the
    path a file, a directory, are its parents files), so it must not queue
    behind writers for the lock.
    """
    try:
        hdr = a.h
        seq = hdr[_H_WSEQ]
        if seq & 1 or hdr[_H_CLOSED]:
            return RETRY
        found = a.find(kbz, h)[1] >= 0
    except Exception:  # a torn read; the lock sorts it out
        return RETRY
    return found if hdr[_H_WSEQ] == seq else RETRY


def _view(a: _arena.Arena, meta: _arena.Meta, b: int) -> np.ndarray[Any, Any]:
    """A flat read-only array over the value's bytes in block ``b``; nothing pinned yet."""
    k = b * _BLK
    s, off = a.bq[k + _B_SEG], a.bq[k + _B_OFF]
    gen = a.sq[s * _SEG + _S_GEN]
    item = a.ro_maps.get(s)
    mm = item[1] if item is not None and item[0] == gen else a.map_segment(s, gen, False)
    # Every view derived from this one keeps its base alive: when that dies,
    # no view of the block is left in this process (Arena.track).
    return np.frombuffer(mm, meta[1], meta[3], off)


def _shaped(view: np.ndarray[Any, Any] | None, meta: _arena.Meta) -> np.ndarray[Any, Any]:
    """``view`` in the value's shape and order; a new empty array for an empty value."""
    _, dtype, shape, _, order, _, _ = meta
    if view is None:
        empty = np.empty(shape, dtype, order=order)
        empty.flags.writeable = False
        return empty
    return view if len(shape) == 1 else view.reshape(shape, order=order)


def read_meta(a: _arena.Arena, e: int) -> _arena.Meta:
    """The decoded description of entry ``e``'s value (not cached here)."""
    mseq = a.eq[e * _EQ + ix.E_MSEQ]
    dt, shape, flags = a.read_entry(e)
    return make_meta(mseq, ix.decode_dtype(dt), shape, flags, dt)
