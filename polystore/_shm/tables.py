"""The control segment's tables, the undo journal that makes each change atomic, the key index.

The journal
-----------
The store lock is an ``flock``, which the kernel releases when its holder
dies: the next process gets the lock over whatever the dead one left half
done. So every locked section is a transaction:

* each change to shared state goes through :meth:`Tables.set`, which first
  appends ``(index, old value)`` to the journal in the control segment and
  counts it in ``H_LOG_LEN``, and only then stores the new value;
* the section commits by storing ``H_LOG_LEN = 0``, one aligned 8-byte store
  that a process dies either before or after;
* whoever takes the lock next and finds ``H_LOG_LEN > 0`` puts the old values
  back, newest first (:meth:`Tables.rollback`): the store is as it was before
  the dead section began. Rolling back twice is harmless, so a process killed
  while rolling back leaves the work to the next one.

A record is written and counted before the store it covers, and a process's
stores reach shared memory in program order (x86 keeps stores in order, and
a killed process loses none it made), so a counted record always names a
store that either happened or did not.

The views other code reads the tables through are read-only, so a write
that bypasses the journal fails at once instead of corrupting silently. The
only writes outside it are these, each safe without it:

* a process's own row of the pin table, which nobody else writes while it lives;
* an entry record taken off the free list in the same section (unreachable
  until the journaled write that links it into the hash table);
* the seqlock counter ``H_WSEQ`` and the journal itself;
* the ``H_*_BACKED`` marks, which only grow, and only after the memory they
  cover was reserved.

A long operation (reaping a dead process, evicting many segments) commits
after each whole step with :meth:`Allocator.commit`, so the journal stays
small; that is only done where every change made so far in the section leaves
the store consistent.

The key index
-------------
Linear probing, no tombstones: :meth:`Tables.remove` moves later keys of a
probe run back into the hole (backward-shift deletion), so a lookup stops at
the first empty slot and no rebuild is ever needed. Readers that race a
writer are sent to the lock by the seqlock, so they never act on a run that
is being shifted.
"""

from __future__ import annotations

import mmap
import zlib
from typing import Any

import numpy as np

from ..exceptions import StorageError
from . import faults as _faults
from . import layout as ix

__all__ = ["Tables"]

_EQ = ix.ENT_SIZE // 8  # int64 slots per entry record
_HASH_MASK = 0xFFFFFFFF
_H_LOG_LEN = ix.H_LOG_LEN


class Tables:
    """Typed views of a mapped control segment, its journal and the key index kept in it.

    The methods that change shared memory expect the caller to hold the store
    lock. Subclasses provide :attr:`name` and :meth:`back_entries`.

    Attributes:
        q: the one writable int64 view of the whole segment (journal, seqlock).
        h, ht, eq, bq, sq, pq: read-only int64 views of the header, hash
            table, entries, blocks, segments and processes; ``eb`` the entries
            as bytes; ``pins`` the (writable) pin table.
        HT0, E0, B0, S0, P0, L0: int64 index of each section in :attr:`q`.
    """

    name: str

    def __init__(self, mm: mmap.mmap, layout: ix.Layout) -> None:
        self.layout = layout
        self.mask = layout.ht_cap - 1
        self.offsets = off = layout.offsets()
        whole = memoryview(mm)
        ro = whole.toreadonly()

        def part(section: str, view: memoryview) -> memoryview:
            start, length = off[section]
            return view[start : start + length]

        self.q = whole.cast("q")
        self.h = part("header", ro).cast("q")
        self.ht = part("ht", ro).cast("q")
        self.eb = part("ent", ro)
        self.eq = self.eb.cast("q")
        self.bq = part("blk", ro).cast("q")
        self.sq = part("seg", ro).cast("q")
        self.pq = part("proc", ro).cast("q")
        self.pins = part("pins", whole).cast("i")
        self._ent_w = part("ent", whole)  # fresh entries only: see fill_entry()
        self._ent_wq = self._ent_w.cast("q")
        self._whole = whole
        self._ro = ro
        self.HT0, self.E0, self.B0, self.S0, self.P0, self.L0 = (
            off[name][0] // 8 for name in ("ht", "ent", "blk", "seg", "proc", "log")
        )
        self.ht_np = np.frombuffer(self.ht, dtype=np.int64)
        self.blk_np = np.frombuffer(self.bq, dtype=np.int64).reshape(layout.max_blocks, -1)
        self.seg_np = np.frombuffer(self.sq, dtype=np.int64).reshape(layout.max_segs, -1)
        self.proc_np = np.frombuffer(self.pq, dtype=np.int64).reshape(layout.max_procs, -1)
        self.pins_np = np.frombuffer(self.pins, dtype=np.int32).reshape(layout.max_procs, -1)
        #: the C view of the segment (polystore._shm.fast), set by the arena
        self.fast: Any = None
        #: entries freed in the section under way, which fill_entry refuses
        self.freed_now: set[int] = set()

    def release_views(self) -> None:
        """Release the views of the tables, as far as nothing else holds them."""
        if self.fast is not None:
            self.fast.release()
            self.fast = None
        del self.ht_np, self.blk_np, self.seg_np, self.proc_np, self.pins_np
        views = (
            self.q, self.h, self.ht, self.eq, self.eb, self.bq, self.sq, self.pq, self.pins,
            self._ent_wq, self._ent_w, self._ro,
        )  # fmt: skip
        for view in (*views, self._whole):
            try:
                view.release()
            except BufferError:
                pass  # exported further: released with the last view of it

    # -- the journal ---------------------------------------------------------------------
    def set(self, i: int, value: int) -> None:
        """Store ``value`` at int64 index ``i`` of the segment, undoably (locked)."""
        q = self.q
        if _faults.kill_at:
            _faults.step()
        n = q[_H_LOG_LEN]
        if n >= ix.LOG_RECORDS:
            raise RuntimeError(
                f"a locked section of shared array store {self.name!r} changed more than "
                f"{ix.LOG_RECORDS} words without committing (a bug in polystore)"
            )
        r = self.L0 + 2 * n
        q[r] = i
        q[r + 1] = q[i]
        q[_H_LOG_LEN] = n + 1  # the record counts from here: it names a store not yet made
        if _faults.kill_at:
            _faults.step()
        q[i] = value

    def set_block(self, b: int, field: int, value: int) -> None:
        """Journaled store into field ``field`` of block record ``b``."""
        self.set(self.B0 + b * ix.BLK_FIELDS + field, value)

    def set_seg(self, s: int, field: int, value: int) -> None:
        """Journaled store into field ``field`` of segment record ``s``."""
        self.set(self.S0 + s * ix.SEG_FIELDS + field, value)

    def add(self, slot: int, delta: int) -> None:
        """Journaled ``header[slot] += delta``."""
        self.set(slot, self.q[slot] + delta)

    def rollback(self) -> int:
        """Undo the journaled stores of a section that did not commit; return how many.

        Newest first, so a word stored twice ends with the value it had
        before the section. Idempotent: a process killed in here leaves the
        journal as it was for the next one.
        """
        q = self.q
        n = q[_H_LOG_LEN]
        if n <= 0 or n > ix.LOG_RECORDS:
            q[_H_LOG_LEN] = 0
            return 0
        limit, first_log = len(q), self.L0
        for j in range(n - 1, -1, -1):
            r = first_log + 2 * j
            i = q[r]
            # Only a bug could record these; never let a record reach the
            # journal itself, the seqlock or past the end of the segment.
            if 0 <= i < limit and i != ix.H_WSEQ and not first_log <= i < r + 2:
                if _faults.kill_at:
                    _faults.step()
                q[i] = q[r + 1]
        q[_H_LOG_LEN] = 0
        self.freed_now.clear()
        return n

    # -- the key index -------------------------------------------------------------------
    # Slots: 0 empty, else hash << 32 | (entry + 1); a key sits in the probe
    # run that starts at hash & mask, with no empty slot before it.

    def find(self, kbz: bytes, h: int) -> tuple[int, int]:
        """(slot, entry) of a key (``kbz`` is its bytes plus a NUL); entry -1 if absent.

        For an absent key the slot is where :meth:`insert` puts it.
        """
        ht, eb, mask = self.ht, self.eb, self.mask
        n = len(kbz)
        i = h & mask
        while True:
            v = ht[i]
            if v == 0:
                return i, -1
            if v >> 32 == h:
                e = (v & _HASH_MASK) - 1
                o = e * ix.ENT_SIZE + ix.E_KEY
                if eb[o : o + n] == kbz:
                    return i, e
            i = (i + 1) & mask

    def new_entry(self) -> int:
        """Take an entry record for a key or a new description of its value (locked)."""
        e = self.h[ix.H_ENT_FREE]
        if e >= 0:
            self.set(ix.H_ENT_FREE, self.eq[e * _EQ + ix.E_NEXT])
            return e
        e = self.h[ix.H_ENT_HW]
        if e >= self.layout.max_keys:
            raise StorageError(
                f"shared array store {self.name!r}: the key index is full "
                f"(max_keys={self.layout.max_keys}); create it with a larger max_keys"
            )
        self.back_entries(e)
        self.set(ix.H_ENT_HW, e + 1)
        return e

    def back_entries(self, e: int) -> None:
        """Make sure entry record ``e`` has memory behind it (see Allocator)."""
        raise NotImplementedError

    def fill_entry(
        self,
        e: int,
        kb: bytes,
        value: tuple[int, int, int, bytes, tuple[int, ...], int],
    ) -> None:
        """Write all of fresh entry ``e``: key, ``(block, seq, nbytes, dtype, shape, flags)``.

        Not journaled: ``e`` came from :meth:`new_entry` in this section and
        no slot names it yet. Its free-list link is left alone, since a
        rollback makes it a free entry again. Invariant kept (and checked
        here): ``e`` was not freed earlier in the same section, or a rollback
        would give the key it belonged to a record rewritten without a
        journal; a section takes all its fresh entries before it frees any
        (``write._prepare``).
        """
        if e in self.freed_now:
            raise RuntimeError(
                f"entry {e} of shared array store {self.name!r} was freed in this section "
                "and cannot be rewritten in it (a bug in polystore)"
            )
        b, seq, nbytes, dt, shape, flags = value
        eq, eb = self._ent_wq, self._ent_w
        k = e * _EQ
        o = e * ix.ENT_SIZE
        eb[o + ix.E_KEY : o + ix.E_KEY + len(kb) + 1] = kb + b"\0"
        eb[o + ix.E_DTYPE : o + ix.E_DTYPE + len(dt)] = dt
        first = k + ix.E_SHAPE // 8
        for j, extent in enumerate(shape):
            eq[first + j] = extent
        eq[k + ix.E_META] = len(kb) | len(shape) << 16 | flags << 24 | len(dt) << 32
        eq[k + ix.E_BLOCK] = b
        eq[k + ix.E_NBYTES] = nbytes
        eq[k + ix.E_SEQ] = seq
        eq[k + ix.E_MSEQ] = seq
        # E_NEXT stays as it is: a rollback puts the entry back on the free
        # list, whose rest hangs on that link.

    def insert(self, i: int, h: int, e: int) -> None:
        """Link filled entry ``e`` into empty slot ``i`` (from :meth:`find`)."""
        self.set(self.HT0 + i, (h << 32) | (e + 1))
        self.add(ix.H_NKEYS, 1)

    def replace(self, i: int, h: int, e: int, old: int) -> None:
        """Make slot ``i`` name filled entry ``e`` instead of ``old``, which is freed."""
        self.set(self.HT0 + i, (h << 32) | (e + 1))
        self._free_entry(old)

    def remove(self, i: int, e: int) -> None:
        """Remove the key in slot ``i`` whose entry is ``e``."""
        mask, ht = self.mask, self.ht
        self.set(self.HT0 + i, 0)
        j = i
        while True:
            j = (j + 1) & mask
            v = ht[j]
            if v == 0:
                break
            home = (v >> 32) & mask
            # The key in j stays if its home lies cyclically in (i, j]: the
            # hole at i is not on its probe path. Otherwise it moves into it.
            stays = (i < home <= j) if i <= j else (home > i or home <= j)
            if not stays:
                self.set(self.HT0 + i, v)
                self.set(self.HT0 + j, 0)
                i = j
        self.add(ix.H_NKEYS, -1)
        self._free_entry(e)

    def _free_entry(self, e: int) -> None:
        self.set(self.E0 + e * _EQ + ix.E_NEXT, self.h[ix.H_ENT_FREE])
        self.set(ix.H_ENT_FREE, e)
        self.freed_now.add(e)

    def entries(self) -> list[int]:
        """Entries of every stored key."""
        live = self.ht_np[self.ht_np != 0]
        return ((live & _HASH_MASK) - 1).tolist()

    def key_of(self, e: int) -> str:
        """The key of entry ``e``."""
        o = e * ix.ENT_SIZE + ix.E_KEY
        n = self.eq[e * _EQ + ix.E_META] & 0xFFFF
        return bytes(self.eb[o : o + n]).decode("utf-8", "surrogatepass")

    @staticmethod
    def ht_hash(kb: bytes) -> int:
        """The 31-bit hash of a key's bytes."""
        return zlib.crc32(kb) & 0x7FFFFFFF

    def write_value(self, e: int, b: int, seq: int, nbytes: int) -> None:
        """Point entry ``e`` at new bytes of the same dtype, shape and flags."""
        k = self.E0 + e * _EQ
        self.set(k + ix.E_BLOCK, b)
        self.set(k + ix.E_NBYTES, nbytes)
        self.set(k + ix.E_SEQ, seq)

    def read_entry(self, e: int) -> tuple[bytes, tuple[int, ...], int]:
        """(dtype description, shape, flags) of entry ``e``."""
        k = e * _EQ
        meta = self.eq[k + ix.E_META]
        ndim, flags, dlen = (meta >> 16) & 0xFF, (meta >> 24) & 0xFF, (meta >> 32) & 0xFFFF
        o = e * ix.ENT_SIZE + ix.E_DTYPE
        first = k + ix.E_SHAPE // 8
        return bytes(self.eb[o : o + dlen]), tuple(self.eq[first : first + ndim]), flags
