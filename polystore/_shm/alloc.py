"""Where array bytes live: blocks in recycled data segments, and who may reuse them.

An :class:`Allocator` keeps the bookkeeping of a store's data in its control
segment (layout in :mod:`polystore._shm.layout`):

* a *block* holds one value; blocks of one size class share a segment when
  they are small (a slab), a large block has a segment of its own;
* free blocks wait on one free list per size class, mapped and faulted in,
  for the next put of that size; a segment whose blocks are all free is
  *idle*, and idle segments beyond the store's ``cache_bytes`` are unlinked,
  least recently idle first;
* a new segment is created only after the free space of ``/dev/shm`` and the
  store's ``max_bytes`` were checked, and its pages are populated at once, so
  that running out of memory is an error here instead of SIGBUS later.

Every method expects the caller to hold the store lock.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from ..exceptions import ShmFullError, StorageError
from . import layout as ix

__all__ = ["Allocator", "populate", "shm_free_bytes", "unlink_quietly"]

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def shm_free_bytes() -> int:
    """Bytes an unprivileged process may still allocate in ``/dev/shm``."""
    st = os.statvfs(ix.SHM_DIR)
    return st.f_bavail * st.f_frsize


def populate(mm: mmap.mmap, fd: int, size: int) -> None:
    """Fault in every page of a mapping now, or fail here instead of by SIGBUS later."""
    try:
        mm.madvise(MADV_POPULATE_WRITE, 0, size)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # Kernels before 5.14 lack MADV_POPULATE_WRITE; reserving the pages
        # still turns "tmpfs is full" into ENOSPC here rather than SIGBUS later.
        os.posix_fallocate(fd, 0, size)


def unlink_quietly(path: str) -> None:
    """Remove a file that may be gone already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # already gone: what we wanted


class Allocator(ix.Tables):
    """Blocks, segments and the processes that use them (see the module docstring).

    Subclasses provide the identity of the store and this process's mappings.
    """

    owner_pid: int
    name: str
    slot: int  # this process's row in the process table, -1 before its first use
    ro_maps: dict[int, tuple[int, mmap.mmap]]
    rw_maps: dict[int, tuple[int, mmap.mmap]]

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
        bq, hdr = self.bq, self.h
        k = b * ix.BLK_FIELDS
        head = ix.H_CLASS0 + bq[k + ix.B_CLS]
        first = hdr[head]
        bq[k + ix.B_STATE] = ix.FREE
        bq[k + ix.B_OWNER] = -1
        bq[k + ix.B_PREV] = -1
        bq[k + ix.B_NEXT] = first
        if first >= 0:
            bq[first * ix.BLK_FIELDS + ix.B_PREV] = b
        hdr[head] = b

    def unlink_free(self, b: int) -> None:
        """Take block ``b`` off its free list."""
        bq = self.bq
        k = b * ix.BLK_FIELDS
        prev, nxt = bq[k + ix.B_PREV], bq[k + ix.B_NEXT]
        if prev >= 0:
            bq[prev * ix.BLK_FIELDS + ix.B_NEXT] = nxt
        else:
            self.h[ix.H_CLASS0 + bq[k + ix.B_CLS]] = nxt
        if nxt >= 0:
            bq[nxt * ix.BLK_FIELDS + ix.B_PREV] = prev

    def new_desc(self) -> int:
        """A block descriptor not in use; MemoryError if all are."""
        hdr = self.h
        d = hdr[ix.H_BLK_FREE]
        if d >= 0:
            hdr[ix.H_BLK_FREE] = self.bq[d * ix.BLK_FIELDS + ix.B_NEXT]
            return d
        d = hdr[ix.H_BLK_HW]
        if d >= self.layout.max_blocks:
            raise MemoryError(f"no free block descriptor (max_blocks={self.layout.max_blocks})")
        hdr[ix.H_BLK_HW] = d + 1
        return d

    def drop_desc(self, d: int) -> None:
        """Give back descriptor ``d``."""
        bq = self.bq
        k = d * ix.BLK_FIELDS
        for field in range(ix.BLK_FIELDS):
            bq[k + field] = 0
        bq[k + ix.B_STATE] = ix.UNUSED
        bq[k + ix.B_SEG] = -1
        bq[k + ix.B_NEXT] = self.h[ix.H_BLK_FREE]
        self.h[ix.H_BLK_FREE] = d

    def set_fields(self, view: memoryview, k: int, values: dict[int, int]) -> None:
        """Write several int64 fields of one record."""
        for field, value in values.items():
            view[k + field] = value

    def blocks_of(self, s: int, state: int) -> list[int]:
        """Blocks of segment ``s`` in ``state``."""
        blk = self.blk_np[: self.h[ix.H_BLK_HW]]
        return np.flatnonzero((blk[:, ix.B_SEG] == s) & (blk[:, ix.B_STATE] == state)).tolist()

    # -- blocks ---------------------------------------------------------------------------

    def pop_free(self, cls: int) -> int:
        """Take a free block of class ``cls`` (see :meth:`first_free`); -1 if none (locked)."""
        b = self.first_free(cls)
        if b < 0 and self.sweep_retired():
            b = self.first_free(cls)
        if b >= 0:
            self.unlink_free(b)
            k = b * ix.BLK_FIELDS
            self.bq[k + ix.B_STATE] = ix.WRITING
            self.bq[k + ix.B_OWNER] = self.slot
            self._seg_use(self.bq[k + ix.B_SEG], +1)
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
            self.bq[b * ix.BLK_FIELDS + ix.B_STATE] = ix.RETIRED
        else:
            self.free(b)

    def sweep_retired(self) -> int:
        """Free the retired blocks that no view holds any more; return how many (locked)."""
        blk = self.blk_np[: self.h[ix.H_BLK_HW]]
        retired = np.flatnonzero(blk[:, ix.B_STATE] == ix.RETIRED)
        if not len(retired):
            return 0
        held = self.pins_np[: self.h[ix.H_PROC_HW], retired].any(axis=0)
        done = retired[~held].tolist()
        for b in done:
            self.free(b)
        return len(done)

    def reusable(self, b: int, cls: int) -> bool:
        """Whether block ``b`` has class ``cls`` and no process holds a view of it (locked)."""
        return self.bq[b * ix.BLK_FIELDS + ix.B_CLS] == cls and not self.pinned(b)

    def mark_live(self, b: int) -> None:
        """Block ``b`` now holds an installed value (locked)."""
        k = b * ix.BLK_FIELDS
        self.bq[k + ix.B_STATE] = ix.LIVE
        self.bq[k + ix.B_OWNER] = -1

    # -- segments --------------------------------------------------------------------------

    def _seg_use(self, s: int, delta: int) -> None:
        k = s * ix.SEG_FIELDS
        sq, h = self.sq, self.h
        used = sq[k + ix.S_USED] + delta
        sq[k + ix.S_USED] = used
        if used == 0:
            h[ix.H_IDLE] += sq[k + ix.S_SIZE]
            sq[k + ix.S_STAMP] = h[ix.H_SEQ]
            if h[ix.H_IDLE] > h[ix.H_CACHE_BYTES]:
                self.evict_idle(h[ix.H_IDLE] - h[ix.H_CACHE_BYTES])
        elif used == 1 and delta > 0:
            h[ix.H_IDLE] -= sq[k + ix.S_SIZE]

    def evict_idle(self, need: int) -> int:
        """Unlink idle segments, least recently idle first, until ``need`` bytes are gone."""
        seg = self.seg_np
        idle = np.flatnonzero((seg[:, ix.S_STATE] == ix.SEG_LIVE) & (seg[:, ix.S_USED] == 0))
        freed = 0
        for s in idle[np.argsort(seg[idle, ix.S_STAMP], kind="stable")].tolist():
            if freed >= need:
                break
            freed += self.sq[s * ix.SEG_FIELDS + ix.S_SIZE]
            for b in self.blocks_of(s, ix.FREE):
                self.unlink_free(b)
                self.drop_desc(b)
            self._drop_segment(s)
            self.h[ix.H_IDLE] -= self.sq[s * ix.SEG_FIELDS + ix.S_SIZE]
        return freed

    def drop_reservation(self, s: int) -> None:
        """Forget a segment whose creation did not finish (locked)."""
        for d in self.blocks_of(s, ix.RESERVED):
            self.drop_desc(d)
        self._drop_segment(s)

    def _drop_segment(self, s: int) -> None:
        k = s * ix.SEG_FIELDS
        gen = self.sq[k + ix.S_GEN]
        self.sq[k + ix.S_STATE] = ix.SEG_EMPTY
        self.h[ix.H_TOTAL] -= self.sq[k + ix.S_SIZE]
        self.h[ix.H_EPOCH] += 1
        unlink_quietly(ix.seg_path(self.owner_pid, self.name, s, gen))
        for cache in (self.ro_maps, self.rw_maps):
            if s in cache and cache[s][0] == gen:
                del cache[s]

    def _make_room(self, size: int) -> None:
        h = self.h
        limit = h[ix.H_MAX_BYTES]
        if limit and h[ix.H_TOTAL] + size > limit:
            self.evict_idle(h[ix.H_TOTAL] + size - limit)
            if h[ix.H_TOTAL] + size > limit:
                where = f"shared array store {self.name!r} (max_bytes={limit})"
                raise ShmFullError(size, max(0, limit - h[ix.H_TOTAL]), where)
        free = shm_free_bytes()
        if free < size:
            self.evict_idle(size - free)
            free = shm_free_bytes()
            if free < size:
                raise ShmFullError(size, free, ix.SHM_DIR)

    def _reserve(self, cls: int, nblk: int, size: int) -> tuple[int, int, list[int]]:
        self._make_room(size)
        empty = np.flatnonzero(self.seg_np[:, ix.S_STATE] == ix.SEG_EMPTY)
        if not len(empty):
            raise StorageError(
                f"shared array store {self.name!r} has {self.layout.max_segs} segments "
                "already; create it with a larger max_segs"
            )
        s = int(empty[0])
        descs: list[int] = []
        try:
            for _ in range(nblk):
                descs.append(self.new_desc())
        except MemoryError as exc:
            for d in descs:
                self.drop_desc(d)
            raise StorageError(
                f"shared array store {self.name!r}: {exc}; create it with a larger max_blocks"
            ) from None
        gen = self.sq[s * ix.SEG_FIELDS + ix.S_GEN] + 1
        self.set_fields(self.sq, s * ix.SEG_FIELDS, {
            ix.S_GEN: gen, ix.S_SIZE: size, ix.S_CLS: cls, ix.S_NBLK: nblk, ix.S_USED: 0,
            ix.S_OWNER: self.slot, ix.S_STAMP: 0, ix.S_STATE: ix.SEG_CREATING,
        })  # fmt: skip
        step = ix.CLASS_SIZES[cls]
        for j, d in enumerate(descs):
            self.set_fields(self.bq, d * ix.BLK_FIELDS, {
                ix.B_SEG: s, ix.B_OFF: j * step, ix.B_CLS: cls, ix.B_STATE: ix.RESERVED,
                ix.B_NEXT: -1, ix.B_PREV: -1, ix.B_OWNER: self.slot, ix.B_SPARE: 0,
            })  # fmt: skip
        self.h[ix.H_TOTAL] += size
        return s, gen, descs

    def _create_file(self, path: str, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            try:
                populate(mm, fd, size)
            except OSError as exc:
                mm.close()
                if exc.errno in (errno.ENOMEM, errno.EFAULT, errno.ENOSPC):
                    raise ShmFullError(size, shm_free_bytes(), ix.SHM_DIR) from exc
                raise
        finally:
            os.close(fd)
        return mm

    def reap(self) -> None:
        """Take back the pins, blocks and segments of processes that died (locked)."""
        pq = self.pq
        for p in np.flatnonzero(self.proc_np[:, ix.P_PID]).tolist():
            k = p * ix.PROC_FIELDS
            if p != self.slot and not ix.is_alive(pq[k + ix.P_PID], pq[k + ix.P_START]):
                self._reclaim(p)

    def _reclaim(self, p: int) -> None:
        hw = self.h[ix.H_BLK_HW]
        self.pins_np[p] = 0
        self.sweep_retired()
        blk = self.blk_np[:hw]
        writing = (blk[:, ix.B_OWNER] == p) & (blk[:, ix.B_STATE] == ix.WRITING)
        for b in np.flatnonzero(writing).tolist():
            self.free(b)  # a put that never finished
        seg = self.seg_np
        creating = (seg[:, ix.S_STATE] == ix.SEG_CREATING) & (seg[:, ix.S_OWNER] == p)
        for s in np.flatnonzero(creating).tolist():
            self.drop_reservation(s)
        self.proc_np[p] = 0
