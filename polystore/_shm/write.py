"""The write path of :class:`~polystore.SharedArrayStore`: copying a value in, installing it.

A put of up to :data:`SMALL_PUT` bytes copies while it holds the store lock,
into the key's own block when no reader pins it, else into a free block. A
larger put takes a block under the lock, copies without it (no other process
can see that block yet), and takes the lock again to point the key at it.
Either way the old block is retired, and freed once no reader pins it.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from ..exceptions import ShmFullError, StorageError
from . import arena as _arena
from . import layout as ix
from .read import make_meta as _meta

__all__ = ["SMALL_PUT", "put"]

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
) -> None:
    """Store a copy of ``arr`` under ``key`` (``parts``: its bytes, bytes + NUL and hash)."""
    kb, kbz, h = parts
    dt = ix.encode_dtype(arr.dtype)
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
    if nbytes > ix.CLASS_SIZES[-1]:
        raise ShmFullError(nbytes, ix.CLASS_SIZES[-1], f"shared array store {name!r}")
    cls = ix.class_of(nbytes) if nbytes else -1
    value = (nbytes, arr.dtype, dt, arr.shape, flags)
    b = -1
    a.acquire()
    try:
        if a.slot < 0:
            a.my_slot()
        i, e = a.find(kbz, h)
        if e >= 0 and not overwrite:
            raise FileExistsError(errno.EEXIST, "key exists", key)
        if nbytes == 0:
            return _install(name, a, i, e, kb, -1, value)
        if nbytes <= SMALL_PUT:
            # Small values are copied while holding the lock, which makes
            # overwriting in place safe when no view of the old value exists.
            old = a.eq[e * _EQ + _E_BLOCK] if e >= 0 else -1
            if old >= 0 and a.reusable(old, cls):
                _copy(a, old, arr, src, nbytes)
                return _install(name, a, i, e, kb, old, value)
            b = a.pop_free(cls)
            if b >= 0:
                try:
                    _copy(a, b, arr, src, nbytes)
                    return _install(name, a, i, e, kb, b, value)
                except BaseException:
                    a.free(b)
                    raise
        else:
            b = a.pop_free(cls)
    finally:
        a.release()
    if b < 0:
        b = a.grow(cls)
    try:
        _copy(a, b, arr, src, nbytes)  # outside the lock: no one else sees b
        a.acquire()
        try:
            i, e = a.find(kbz, h)
            if e >= 0 and not overwrite:
                raise FileExistsError(errno.EEXIST, "key exists", key)
            _install(name, a, i, e, kb, b, value)
        finally:
            a.release()
    except BaseException:
        a.abandon(b)
        raise


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


def _install(
    name: str,
    a: _arena.Arena,
    i: int,
    e: int,
    kb: bytes,
    b: int,
    value: tuple[int, np.dtype[Any], bytes, tuple[int, ...], int],
) -> None:
    """Point key ``kb`` (slot ``i``, entry ``e`` from find) at block ``b`` (locked)."""
    nbytes, dtype, dt, shape, flags = value
    a.h[_H_SEQ] = seq = a.h[_H_SEQ] + 1
    if e >= 0:
        old = a.eq[e * _EQ + _E_BLOCK]
        meta = a.meta.get(e)
        if (  # the steady state: same dtype, shape and layout as before
            meta is not None
            and meta[0] == a.eq[e * _EQ + _E_MSEQ]
            and meta[2] == shape
            and meta[5] == flags
            and meta[6] == dt
        ):
            if old == b:  # overwritten in place: only the put number changes
                a.eq[e * _EQ + _E_SEQ] = seq
                return
            a.write_value(e, b, seq, nbytes)
            _swap(a, old, b)
            return
    else:
        try:
            e = a.insert(i, a.ht_hash(kb), kb)
        except MemoryError as exc:
            raise StorageError(
                f"shared array store {name!r}: {exc}; create it with a larger max_keys"
            ) from None
        old = -1
    a.write_entry(e, b, seq, nbytes, dt, shape, flags)
    a.meta[e] = _meta(seq, dtype, shape, flags, dt)
    _swap(a, old, b)


def _swap(a: _arena.Arena, old: int, b: int) -> None:
    if b >= 0:
        a.mark_live(b)
    if old >= 0 and old != b:
        a.retire(old)
