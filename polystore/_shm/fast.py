"""The optional C fast paths of :class:`~polystore.SharedArrayStore`.

``polystore._shm._fastpath`` (built from ``_fastpath*.c`` at install time when a C
compiler is there) repeats the common cases of the store in C: the
lock-free lookup and pin of a ``get`` (its value description cached, or of a
dtype this process has met), a small ``put`` of a key's same dtype and shape
into a free block, and the end of a ``create`` that publishes a new key. It
also takes and drops the store's locks (``hold``, ``let_go``, ``Section``),
each run of steps in one call that no Python signal handler can cut in two.
Every other case, and every error, goes through the Python paths in ``read``
and ``write``, which define the semantics; the C code declines rather than
decides.

:data:`ENABLED` says whether the extension is in use. Setting
``POLYSTORE_NO_FASTPATH=1`` in the environment turns it off for a process
(the test suite runs the store both ways).
"""

from __future__ import annotations

import os
from typing import Any

from . import layout as ix

__all__ = [
    "AVAILABLE",
    "ENABLED",
    "Section",
    "hold",
    "key_parts",
    "let_go",
    "make_ctl",
    "set_key_cache",
]

try:
    from . import _fastpath
except ImportError:  # built without a C compiler, or POLYSTORE_PURE_PYTHON=1
    _fastpath = None  # type: ignore[assignment]

#: the extension was built and imports
AVAILABLE = _fastpath is not None
#: the stores of this process use it (new stores read this when they map)
ENABLED = AVAILABLE and os.environ.get("POLYSTORE_NO_FASTPATH", "") in ("", "0")

#: field numbers, in the order _fastpath.c expects them
_FIELDS = (
    ix.ENT_SIZE, ix.E_BLOCK, ix.E_NBYTES, ix.E_SEQ, ix.E_META, ix.E_MSEQ, ix.E_KEY,
    ix.E_DTYPE, ix.E_SHAPE, ix.BLK_FIELDS, ix.B_SEG, ix.B_OFF, ix.B_CLS,
    ix.SEG_FIELDS, ix.S_GEN, ix.H_WSEQ, ix.H_CLOSED, ix.H_EPOCH, ix.H_SEQ,
    ix.H_PROC_HW, ix.H_LOG_LEN, ix.H_UNLINK_N, ix.H_CLASS0, ix.B_STATE, ix.B_NEXT,
    ix.B_PREV, ix.B_OWNER, ix.S_USED, ix.FREE, ix.LIVE, ix.RETIRED, ix.LOG_RECORDS,
    ix.F_FORTRAN, ix.H_ENT_FREE, ix.E_NEXT, ix.H_NKEYS, ix.WRITING, ix.H_IDLE, ix.S_SIZE,
    ix.H_CACHE_BYTES, ix.S_STAMP, ix.S_SPILL, ix.H_ENT_HW, ix.H_ENT_BACKED,
)  # fmt: skip


def set_key_cache(cache: dict[Any, tuple[bytes, bytes, int]]) -> None:
    """Tell the C paths where the store keeps its validated keys and their hashes."""
    if AVAILABLE:
        _fastpath.set_key_cache(cache, ix.MAX_KEY_BYTES)


#: ``hold(arena, blocking)``: take the arena's thread lock and record its owner
#: in one C call (``Arena.acquire``); ``None`` without C
hold = _fastpath.hold if AVAILABLE else None
#: ``let_go(arena)``: drop the arena's flock and thread lock in one C call;
#: ``None`` without C
let_go = _fastpath.let_go if AVAILABLE else None
#: ``Section(arena)``: ``with arena.locked:`` in C (``Arena``); ``None`` without C
Section = _fastpath.Section if AVAILABLE else None
#: a base whose C ``__exit__`` calls ``_finish``, then ``_fallback`` if that
#: raised (``write.create``); ``None`` without C
ExitGuard = _fastpath.ExitGuard if AVAILABLE else None
#: ``fork_lock(state, arenas, closed)`` and ``fork_unlock(state, timeout_ms)``:
#: the fork hooks' locking in C (:mod:`polystore._shm.fork`); ``None`` without C
fork_lock = _fastpath.fork_lock if AVAILABLE else None
fork_unlock = _fastpath.fork_unlock if AVAILABLE else None

#: ``key_parts(key)``: a key's (bytes, bytes + NUL, hash) made and cached in C,
#: ``None`` for what only the Python path decides; ``None`` itself without C
key_parts = _fastpath.key_parts if AVAILABLE else None


def make_ctl(whole: memoryview, layout: ix.Layout) -> Any:
    """The C view of a mapped control segment, or ``None`` without the fast path."""
    if not ENABLED:
        return None
    off = layout.offsets()
    offsets = tuple(off[name][0] for name in ("header", "ht", "ent", "blk", "seg", "pins", "log"))
    geometry = (
        layout.ht_cap - 1, layout.max_keys, layout.max_blocks, layout.max_segs, layout.max_procs,
    )  # fmt: skip
    return _fastpath.Ctl(whole, offsets, geometry, _FIELDS, tuple(ix.CLASS_SIZES), ix.SMALL_PUT)
