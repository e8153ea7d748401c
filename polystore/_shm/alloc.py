"""Where array bytes live: blocks in recycled data segments, and who may reuse them.

An :class:`Allocator` keeps the bookkeeping of a store's data in its control
segment (layout in :mod:`polystore._shm.layout`):

* a *block* holds one value; blocks of one size class share a segment when
  they are small (a slab), a large block has a segment of its own;
* free blocks wait on one free list per size class, mapped and faulted in,
  for the next put of that size; a segment whose blocks are all free is
  *idle*, and idle segments beyond the store's ``cache_bytes`` are unlinked,
  least recently idle first;
* a new segment is created only after the free space of the store's
  directory and its ``max_bytes`` were checked, and its pages are reserved
  (``posix_fallocate``) before anything touches them, so that running out of
  memory is :class:`~polystore.ShmFullError` here instead of SIGBUS later; the
  control segment's tables are reserved the same way as they grow.

Every change goes through the journal of :mod:`polystore._shm.tables`, and
every method expects the caller to hold the store lock.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from ..exceptions import ShmFullError, StorageError
from . import faults as _faults
from . import layout as ix
from .tables import Tables

__all__ = ["Allocator", "populate", "reserve_memory", "shm_free_bytes", "unlink_quietly"]

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def shm_free_bytes(directory: str) -> int:
    """Bytes an unprivileged process may still allocate in ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def populate(mm: mmap.mmap, size: int) -> None:
    """Fill the page tables of a mapping of memory already reserved, to save faults later."""
    try:
        mm.madvise(MADV_POPULATE_WRITE, 0, size)
    except OSError as exc:
        # Kernels before 5.14 lack it (EINVAL): the pages are reserved all the
        # same, and fault in on first touch.
        if exc.errno != errno.EINVAL:
            raise


def unlink_quietly(path: str) -> None:
    """Remove a file that may be gone already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # already gone: what we wanted


def reserve_memory(fd: int, start: int, length: int, directory: str) -> None:
    """Back ``length`` bytes of a file from ``start`` with memory now (ShmFullError if none)."""
    try:
        os.posix_fallocate(fd, start, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT):
            raise ShmFullError(length, shm_free_bytes(directory), directory) from exc
        raise


#: entries, and blocks with their pin columns, backed by memory at a time
ENT_CHUNK = 64
BLK_CHUNK = 1024


class Allocator(Tables):
    """Blocks, segments and the processes that use them (see the module docstring).

    Subclasses provide the identity of the store, the control file's
    descriptor and this process's mappings.
    """

    owner_pid: int
    dir: str
    spill_dir: str | None  # where segments go that do not fit in ``dir``, if anywhere
    spill_idle = False  # a spilled segment went idle in this section
    slot: int  # this process's row in the process table, -1 before its first use
    ro_maps: dict[int, tuple[int, mmap.mmap]]
    rw_maps: dict[int, tuple[int, mmap.mmap]]
    _fd: int

    # -- committing ------------------------------------------------------------------------
    def commit(self) -> None:
        """Make the section's changes so far permanent, then unlink the segments it dropped.

        Inside a section, only where everything changed so far leaves the
        store consistent (a checkpoint). The unlinks come after the commit
        point: a process killed between the two leaves ``H_UNLINK_N`` set,
        and the next lock holder finishes them (they are idempotent).
        """
        q = self.q
        if q[ix.H_LOG_LEN]:
            if _faults.kill_at:
                _faults.step()
            q[ix.H_LOG_LEN] = 0
        self.freed_now.clear()
        if q[ix.H_UNLINK_N]:
            self.unlink_dropped()

    def unlink_dropped(self) -> None:
        """Unlink the files of segments dropped by committed sections (locked)."""
        q = self.q
        for j in range(min(q[ix.H_UNLINK_N], ix.MAX_UNLINK)):
            s, gen = q[ix.H_UNLINK0 + 2 * j], q[ix.H_UNLINK0 + 2 * j + 1]
            unlink_quietly(self.seg_file(s, gen))
            if _faults.kill_at:
                _faults.step()
        q[ix.H_UNLINK_N] = 0

    def seg_dir(self, s: int) -> str:
        """The directory of data segment ``s``'s file: the store's, or the spill directory."""
        if self.sq[s * ix.SEG_FIELDS + ix.S_SPILL] and self.spill_dir is not None:
            return self.spill_dir
        return self.dir

    def seg_file(self, s: int, gen: int) -> str:
        """The path of incarnation ``gen`` of data segment ``s``."""
        return ix.seg_path(self.seg_dir(s), self.owner_pid, self.name, s, gen)

    # -- memory behind the control segment ------------------------------------------------
    def _back(self, start: int, length: int) -> None:
        if length > 0:
            reserve_memory(self._fd, start, length, self.dir)

    def back_entries(self, e: int) -> None:
        q = self.q
        have = q[ix.H_ENT_BACKED]
        if e < have:
            return
        new = min(max(e + 1, have + ENT_CHUNK), self.layout.max_keys)
        start = self.offsets["ent"][0]
        self._back(start + have * ix.ENT_SIZE, (new - have) * ix.ENT_SIZE)
        q[ix.H_ENT_BACKED] = new

    def back_blocks(self, d: int) -> None:
        """Make sure block record ``d`` and its pin counts have memory behind them."""
        q = self.q
        have = q[ix.H_BLK_BACKED]
        if d < have:
            return
        new = min(max(d + 1, have + BLK_CHUNK), self.layout.max_blocks)
        rec = ix.BLK_FIELDS * 8
        self._back(self.offsets["blk"][0] + have * rec, (new - have) * rec)
        pins, step = self.offsets["pins"][0], self.layout.max_blocks
        for p in range(q[ix.H_ROWS_BACKED]):
            self._back(pins + (p * step + have) * 4, (new - have) * 4)
        q[ix.H_BLK_BACKED] = new

    def back_row(self, p: int) -> None:
        """Make sure row ``p`` of the pin table has memory behind it."""
        q = self.q
        have = q[ix.H_ROWS_BACKED]
        if p < have:
            return
        pins, step, blocks = self.offsets["pins"][0], self.layout.max_blocks, q[ix.H_BLK_BACKED]
        for r in range(have, p + 1):
            self._back(pins + r * step * 4, blocks * 4)
        q[ix.H_ROWS_BACKED] = p + 1

    # -- free lists and descriptors ------------------------------------------------------
    # Free blocks of one size class form a doubly linked list whose head is in
    # the header; descriptors not in use form a singly linked list.

    def first_free(self, cls: int) -> int:
        """A free block of class ``cls``, -1 if none; the block stays on its list.

        For a large class, a block up to three classes larger (within 2x) does too.
        """
        hdr = self.h
        last = cls + 4 if ix.CLASS_SIZES[cls] > ix.SLAB_LIMIT else cls + 1
        for c in range(cls, min(last, ix.N_CLASSES)):
            if hdr[ix.H_CLASS0 + c] >= 0:
                return hdr[ix.H_CLASS0 + c]
        return -1

    def push_free(self, b: int) -> None:
        """Put block ``b`` at the head of its free list."""
        k = b * ix.BLK_FIELDS
        head = ix.H_CLASS0 + self.bq[k + ix.B_CLS]
        first = self.h[head]
        self.set_block(b, ix.B_STATE, ix.FREE)
        self.set_block(b, ix.B_OWNER, -1)
        self.set_block(b, ix.B_PREV, -1)
        self.set_block(b, ix.B_NEXT, first)
        if first >= 0:
            self.set_block(first, ix.B_PREV, b)
        self.set(head, b)

    def unlink_free(self, b: int) -> None:
        """Take block ``b`` off its free list."""
        bq = self.bq
        k = b * ix.BLK_FIELDS
        prev, nxt = bq[k + ix.B_PREV], bq[k + ix.B_NEXT]
        if prev >= 0:
            self.set_block(prev, ix.B_NEXT, nxt)
        else:
            self.set(ix.H_CLASS0 + bq[k + ix.B_CLS], nxt)
        if nxt >= 0:
            self.set_block(nxt, ix.B_PREV, prev)

    def new_desc(self) -> int:
        """A block descriptor not in use."""
        d = self.h[ix.H_BLK_FREE]
        if d >= 0:
            self.set(ix.H_BLK_FREE, self.bq[d * ix.BLK_FIELDS + ix.B_NEXT])
            return d
        d = self.h[ix.H_BLK_HW]
        if d >= self.layout.max_blocks:
            raise StorageError(
                f"shared array store {self.name!r} has no free block descriptor "
                f"(max_blocks={self.layout.max_blocks}); create it with a larger max_blocks"
            )
        self.back_blocks(d)
        self.set(ix.H_BLK_HW, d + 1)
        return d

    def drop_desc(self, d: int) -> None:
        """Give back descriptor ``d``."""
        self.set_block(d, ix.B_STATE, ix.UNUSED)
        self.set_block(d, ix.B_SEG, -1)
        self.set_block(d, ix.B_OWNER, -1)
        self.set_block(d, ix.B_NEXT, self.h[ix.H_BLK_FREE])
        self.set(ix.H_BLK_FREE, d)

    def blocks_of(self, s: int, state: int) -> list[int]:
        """Blocks of segment ``s`` in ``state``."""
        blk = self.blk_np[: self.h[ix.H_BLK_HW]]
        return np.flatnonzero((blk[:, ix.B_SEG] == s) & (blk[:, ix.B_STATE] == state)).tolist()

    # -- blocks ---------------------------------------------------------------------------
    # Invariant: a block is FREE (on exactly one free list), WRITING (owned by
    # the process row in B_OWNER, named by no key), LIVE (named by exactly one
    # entry), RETIRED (named by none, pinned by a view) or RESERVED (its
    # segment is being created). Array bytes are written only into a WRITING
    # block by its owner, or into a block taken off a free list in the same
    # section: never into one a key names.

    def pop_free(self, cls: int) -> int:
        """Take a free block of class ``cls`` (see :meth:`first_free`); -1 if none (locked)."""
        b = self.first_free(cls)
        if b < 0 and self.sweep_retired():
            b = self.first_free(cls)
        if b >= 0:
            self.unlink_free(b)
            self.set_block(b, ix.B_STATE, ix.WRITING)
            self.set_block(b, ix.B_OWNER, self.slot)
            self._seg_use(self.bq[b * ix.BLK_FIELDS + ix.B_SEG], +1)
        return b

    def free(self, b: int) -> None:
        """Return block ``b`` to its free list (locked)."""
        self.push_free(b)
        self._seg_use(self.bq[b * ix.BLK_FIELDS + ix.B_SEG], -1)

    def pinned(self, b: int) -> bool:
        """Whether any process holds a view of block ``b``.

        Readers pin without the lock; the caller made the store's write
        counter odd and then fenced (:meth:`Arena.acquire`), so a reader
        either sees that change and retries or has its pin seen here.
        """
        step = self.layout.max_blocks
        return any(self.pins[b : self.h[ix.H_PROC_HW] * step : step])

    def retire(self, b: int) -> None:
        """Block ``b`` no longer holds a current value: free it once no view remains.

        A retired block is freed by :meth:`sweep_retired`, which the
        allocator runs when a free list comes up empty.
        """
        if self.pinned(b):
            self.set_block(b, ix.B_STATE, ix.RETIRED)
        else:
            self.free(b)

    def sweep_retired(self) -> int:
        """Free the retired blocks that no view holds any more; return how many (locked).

        Commits as it goes: call it only where the section has changed
        nothing that cannot be committed on its own.
        """
        blk = self.blk_np[: self.h[ix.H_BLK_HW]]
        retired = np.flatnonzero(blk[:, ix.B_STATE] == ix.RETIRED)
        if not len(retired):
            return 0
        held = self.pins_np[: self.h[ix.H_PROC_HW], retired].any(axis=0)
        done = retired[~held].tolist()
        for n, b in enumerate(done, 1):
            self.free(b)
            if n % 256 == 0:
                self.commit()
        return len(done)

    def mark_live(self, b: int) -> None:
        """Block ``b`` now holds an installed value (locked)."""
        self.set_block(b, ix.B_STATE, ix.LIVE)
        self.set_block(b, ix.B_OWNER, -1)

    # -- segments --------------------------------------------------------------------------
    def _seg_use(self, s: int, delta: int) -> None:
        # Idle segments beyond cache_bytes are evicted when the section
        # commits (Arena.release), not here in the middle of it.
        k = s * ix.SEG_FIELDS
        sq = self.sq
        used = sq[k + ix.S_USED] + delta
        self.set_seg(s, ix.S_USED, used)
        if used == 0:
            self.add(ix.H_IDLE, sq[k + ix.S_SIZE])
            self.set_seg(s, ix.S_STAMP, self.h[ix.H_SEQ])
            if sq[k + ix.S_SPILL]:
                self.spill_idle = True  # not kept for reuse: evicted when the section ends
        elif used == 1 and delta > 0:
            self.add(ix.H_IDLE, -sq[k + ix.S_SIZE])

    def evict_idle(self, need: int, spilled_only: bool = False) -> int:
        """Unlink idle segments, least recently idle first, until ``need`` bytes are gone.

        Commits after each segment: call it only at a checkpoint.
        """
        seg = self.seg_np
        idle = np.flatnonzero((seg[:, ix.S_STATE] == ix.SEG_LIVE) & (seg[:, ix.S_USED] == 0))
        if spilled_only:
            idle = idle[seg[idle, ix.S_SPILL] != 0]
        freed = 0
        # spilled segments first (they hold disk space), then least recently idle first
        order = np.lexsort((seg[idle, ix.S_STAMP], seg[idle, ix.S_SPILL] == 0))
        for s in idle[order].tolist():
            if freed >= need:
                break
            size = self.sq[s * ix.SEG_FIELDS + ix.S_SIZE]
            for b in self.blocks_of(s, ix.FREE):
                self.unlink_free(b)
                self.drop_desc(b)
            self._drop_segment(s)
            self.add(ix.H_IDLE, -size)
            self.commit()
            freed += size
        return freed

    def drop_reservation(self, s: int) -> None:
        """Forget a segment whose creation did not finish (locked)."""
        for d in self.blocks_of(s, ix.RESERVED):
            self.drop_desc(d)
        self._drop_segment(s)

    def _drop_segment(self, s: int) -> None:
        # The file is unlinked once this section commits (see commit()).
        k = s * ix.SEG_FIELDS
        gen = self.sq[k + ix.S_GEN]
        n = self.h[ix.H_UNLINK_N]
        if n >= ix.MAX_UNLINK:
            raise RuntimeError("too many segments dropped in one section (a bug in polystore)")
        self.set(ix.H_UNLINK0 + 2 * n, s)
        self.set(ix.H_UNLINK0 + 2 * n + 1, gen)
        self.set(ix.H_UNLINK_N, n + 1)
        self.set_seg(s, ix.S_STATE, ix.SEG_EMPTY)
        self.add(ix.H_SPILLED if self.sq[k + ix.S_SPILL] else ix.H_TOTAL, -self.sq[k + ix.S_SIZE])
        self.add(ix.H_EPOCH, 1)
        for cache in (self.ro_maps, self.rw_maps):
            if s in cache and cache[s][0] == gen:
                del cache[s]

    def _make_room(self, size: int) -> bool:
        """Make room for a segment of ``size`` bytes; True: it must go to the spill directory."""
        h = self.h
        limit = h[ix.H_MAX_BYTES]
        if limit and h[ix.H_TOTAL] + size > limit:
            self.evict_idle(h[ix.H_TOTAL] + size - limit)
            if h[ix.H_TOTAL] + size > limit:
                if self.spill_dir is not None:
                    return self._spill_room(size)
                where = f"shared array store {self.name!r} (max_bytes={limit})"
                raise ShmFullError(size, max(0, limit - h[ix.H_TOTAL]), where)
        free = shm_free_bytes(self.dir)
        if free < size:
            self.evict_idle(size - free)
            free = shm_free_bytes(self.dir)
            if free < size:
                if self.spill_dir is not None:
                    return self._spill_room(size)
                raise ShmFullError(size, free, self.dir)
        return False

    def _spill_room(self, size: int) -> bool:
        assert self.spill_dir is not None
        free = shm_free_bytes(self.spill_dir)
        if free < size:
            raise ShmFullError(size, free, f"{self.dir} and the spill directory {self.spill_dir}")
        return True

    def reserve_segment(self, cls: int) -> tuple[int, int, list[int]]:
        """Record a new segment for class ``cls``, to be created next: (slot, generation, blocks).

        Its blocks are RESERVED and it is SEG_CREATING, owned by this
        process's row, so that the reaper drops it if this process dies
        before :meth:`Arena.grow` finishes it.
        """
        nblk, size = ix.segment_shape(cls)
        spill = self._make_room(size)
        empty = np.flatnonzero(self.seg_np[:, ix.S_STATE] == ix.SEG_EMPTY)
        if not len(empty):
            raise StorageError(
                f"shared array store {self.name!r} has {self.layout.max_segs} segments "
                "already; create it with a larger max_segs"
            )
        s = int(empty[0])
        descs = [self.new_desc() for _ in range(nblk)]
        gen = self.sq[s * ix.SEG_FIELDS + ix.S_GEN] + 1
        for field, value in (
            (ix.S_GEN, gen), (ix.S_SIZE, size), (ix.S_CLS, cls), (ix.S_NBLK, nblk),
            (ix.S_USED, 0), (ix.S_OWNER, self.slot), (ix.S_STAMP, 0),
            (ix.S_SPILL, int(spill)), (ix.S_STATE, ix.SEG_CREATING),
        ):  # fmt: skip
            self.set_seg(s, field, value)
        step = ix.CLASS_SIZES[cls]
        for j, d in enumerate(descs):
            for field, value in (
                (ix.B_SEG, s), (ix.B_OFF, j * step), (ix.B_CLS, cls), (ix.B_STATE, ix.RESERVED),
                (ix.B_NEXT, -1), (ix.B_PREV, -1), (ix.B_OWNER, self.slot),
            ):  # fmt: skip
                self.set_block(d, field, value)
        self.add(ix.H_SPILLED if spill else ix.H_TOTAL, size)
        return s, gen, descs

    def create_segment_file(self, s: int, gen: int, size: int) -> mmap.mmap:
        """Create, back and map a data segment's file (no lock needed: no one knows it yet)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW
        fd = os.open(self.seg_file(s, gen), flags, 0o600)
        try:
            os.ftruncate(fd, size)
            reserve_memory(fd, 0, size, self.seg_dir(s))
            mm = mmap.mmap(fd, size)
            populate(mm, size)
        finally:
            os.close(fd)
        return mm

    # -- processes ---------------------------------------------------------------------------
    def reap(self) -> None:
        """Take back the pins, blocks and segments of processes that died (locked)."""
        pq = self.pq
        for p in np.flatnonzero(self.proc_np[:, ix.P_PID]).tolist():
            k = p * ix.PROC_FIELDS
            if p != self.slot and not ix.is_alive(pq[k + ix.P_PID], pq[k + ix.P_START]):
                self.reclaim(p)

    def reclaim(self, p: int) -> None:
        """Give back everything process row ``p`` holds, then free the row (locked).

        Commits after each step: call it only at a checkpoint. A process
        killed half way leaves the row to be reclaimed again (every step can
        be done twice).
        """
        # Not journaled: nobody else writes this row, and a dead process's
        # pins mean nothing whichever way a rollback leaves them.
        self.pins_np[p] = 0
        self.sweep_retired()
        blk = self.blk_np[: self.h[ix.H_BLK_HW]]
        writing = (blk[:, ix.B_OWNER] == p) & (blk[:, ix.B_STATE] == ix.WRITING)
        for b in np.flatnonzero(writing).tolist():
            self.free(b)  # a put that never finished
            self.commit()
        seg = self.seg_np
        creating = (seg[:, ix.S_STATE] == ix.SEG_CREATING) & (seg[:, ix.S_OWNER] == p)
        for s in np.flatnonzero(creating).tolist():
            self.drop_reservation(s)
            self.commit()
        k = self.P0 + p * ix.PROC_FIELDS
        self.set(k + ix.P_PID, 0)
        self.set(k + ix.P_START, 0)
        self.commit()
