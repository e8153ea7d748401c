"""On-disk layout of a :class:`~polystore.SharedArrayStore` and helpers around it.

Files
-----
A store named ``N`` whose owner is process ``P`` lives in ``/dev/shm`` as

* ``polystore-P-N.ctl``: the control segment (header, key index, entry, block,
  segment and process tables, pin counts), mapped by every attached process;
* ``polystore-P-N.S.G``: data segment number ``S`` in its ``G``-th incarnation.

Every name starts with ``polystore-<owner pid>-``, which is how ``python -m
polystore gc`` and the test suite tell whose segments they are.

Control segment
---------------
A header of int64 slots (``H_*``), then tables sized by the store's
configuration, each page aligned:

* ``ht``: open-addressing hash table, one int64 per slot: ``0`` empty, ``-1``
  deleted, else ``hash << 32 | (entry + 1)``;
* ``ent``: one :data:`ENT_SIZE`-byte record per stored key (int64 fields
  ``E_*``, then the key, the dtype description and the shape);
* ``blk``: one record of int64 fields ``B_*`` per data block;
* ``seg``: one record of int64 fields ``S_*`` per data segment;
* ``proc``: one record of int64 fields ``P_*`` per attached process;
* ``pins``: int32 ``[proc, block]``: how many views each process holds. Only
  the process of a row writes it (the reaper too, once that process is dead),
  so a view is pinned and unpinned without the store lock; a block is in use
  while any row of the first ``H_PROC_HW`` counts it.

Readers do not take the store lock either (see ``H_WSEQ``): every locked
section makes the counter odd on entry and even on exit, and a reader checks
that it was even and unchanged around what it read.
"""

from __future__ import annotations

import bisect
import functools
import mmap
import os
import re
import zlib
from typing import Any, NamedTuple

import numpy as np

from ..exceptions import NotShareableError

SHM_DIR = "/dev/shm"
PREFIX = "polystore-"
MAGIC = int.from_bytes(b"PLYSTOR1", "little")
VERSION = 2
PAGE = 4096

# -- header slots (int64) ------------------------------------------------------
H_MAGIC = 0
H_VERSION = 1
H_CTL_SIZE = 2
H_UID = 3
H_PID = 4
H_START = 5
H_MAX_BYTES = 6  # 0: no limit besides /dev/shm itself
H_CACHE_BYTES = 7
H_MAX_KEYS = 8
H_MAX_BLOCKS = 9
H_MAX_PROCS = 10
H_MAX_SEGS = 11
H_CLOSED = 12
H_TOTAL = 13  # bytes of all data segments
H_IDLE = 14  # bytes of data segments with no block in use (the reuse cache)
H_NKEYS = 15
H_EPOCH = 16  # bumped whenever a data segment is unlinked
H_SEQ = 17  # bumped by every put; also orders idle segments
H_ENT_FREE = 18
H_ENT_HW = 19  # entries [0, hw) have been handed out at least once
H_BLK_FREE = 20
H_BLK_HW = 21
H_TOMBS = 22
H_CREATED = 23  # wall-clock seconds
H_WSEQ = 24  # odd while a process holds the store lock; bumped on entry and exit
H_PROC_HW = 25  # rows [0, hw) of the process table have been used
H_CLASS0 = 64  # free-list head of every size class
HEADER_SLOTS = 512

# -- entry record --------------------------------------------------------------
ENT_SIZE = 1024
E_BLOCK = 0  # -1: no data (empty array)
E_NBYTES = 1
E_SEQ = 2
E_META = 3  # key length | ndim << 16 | flags << 24 | dtype length << 32
E_NEXT = 4  # free-list link
E_MSEQ = 5  # seq of the put that last changed dtype, shape or flags
E_KEY = 64  # byte offsets inside the record
E_DTYPE = 320
E_SHAPE = 512
MAX_KEY_BYTES = 255
MAX_DTYPE_BYTES = E_SHAPE - E_DTYPE
MAX_NDIM = (ENT_SIZE - E_SHAPE) // 8
F_FORTRAN = 1
F_BYTES = 2

# -- block, segment and process records (int64 fields) --------------------------
BLK_FIELDS = 8
B_SEG, B_OFF, B_CLS, B_STATE, B_NEXT, B_PREV, B_OWNER, B_SPARE = range(BLK_FIELDS)
FREE, WRITING, LIVE, RETIRED, RESERVED, UNUSED = range(6)

SEG_FIELDS = 8
S_STATE, S_GEN, S_SIZE, S_CLS, S_NBLK, S_USED, S_OWNER, S_STAMP = range(SEG_FIELDS)
SEG_EMPTY, SEG_CREATING, SEG_LIVE = range(3)

PROC_FIELDS = 4
P_PID, P_START = 0, 1

# -- size classes ----------------------------------------------------------------
#: puts up to this size copy while holding the store lock (see _shm_write)
SMALL_PUT = 1 << 20
#: blocks up to this size share a segment ("slab") with others of their class
SLAB_LIMIT = 1 << 20
SLAB_TARGET = 4 << 20
SLAB_MAX_BLOCKS = 64


def _class_sizes() -> list[int]:
    # Four classes per power of two keep the waste of rounding up under 25%.
    sizes = {64}
    for k in range(6, 47):
        for quarter in range(4):
            size = (1 << k) + quarter * (1 << k) // 4
            sizes.add(-(-size // 64) * 64)
    return sorted(sizes)


CLASS_SIZES = _class_sizes()
N_CLASSES = len(CLASS_SIZES)
assert H_CLASS0 + N_CLASSES <= HEADER_SLOTS  # the free-list heads fit in the header


def class_of(nbytes: int) -> int:
    """Index of the smallest size class that holds ``nbytes``."""
    return bisect.bisect_left(CLASS_SIZES, nbytes)


def segment_shape(cls: int) -> tuple[int, int]:
    """(blocks per segment, segment bytes) for a size class."""
    size = CLASS_SIZES[cls]
    nblk = 1 if size > SLAB_LIMIT else max(1, min(SLAB_MAX_BLOCKS, SLAB_TARGET // size))
    return nblk, -(-size * nblk // PAGE) * PAGE


# -- configuration and layout -------------------------------------------------------


class Layout(NamedTuple):
    """Byte offsets of the control segment's tables, derived from the configuration."""

    max_keys: int
    max_blocks: int
    max_procs: int
    max_segs: int

    @property
    def ht_cap(self) -> int:
        """Hash-table slots: a power of two at least twice ``max_keys``."""
        return 1 << (2 * self.max_keys - 1).bit_length()

    def _sections(self) -> list[tuple[str, int]]:
        return [
            ("header", HEADER_SLOTS * 8),
            ("ht", self.ht_cap * 8),
            ("ent", self.max_keys * ENT_SIZE),
            ("blk", self.max_blocks * BLK_FIELDS * 8),
            ("seg", self.max_segs * SEG_FIELDS * 8),
            ("proc", self.max_procs * PROC_FIELDS * 8),
            ("pins", self.max_procs * self.max_blocks * 4),
        ]

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Section name -> (offset, length), page aligned."""
        out = {}
        pos = 0
        for name, length in self._sections():
            out[name] = (pos, length)
            pos += -(-length // PAGE) * PAGE
        out["end"] = (pos, 0)
        return out

    @property
    def size(self) -> int:
        """Bytes of the whole control segment (sparse: untouched pages cost nothing)."""
        return self.offsets()["end"][0]


# -- names ---------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def new_store_name() -> str:
    """A fresh random store name."""
    return os.urandom(6).hex()


def check_store_name(name: object) -> str:
    """Return ``name`` if it can name a store, else raise TypeError/ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"store name must be str, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid store name {name!r}: use 1 to 64 characters from A-Z, a-z, 0-9, "
            "'_' and '-', not starting with '-'"
        )
    return name


def ctl_path(pid: int, name: str) -> str:
    """Path of a store's control segment."""
    return f"{SHM_DIR}/{PREFIX}{pid}-{name}.ctl"


def seg_path(pid: int, name: str, slot: int, gen: int) -> str:
    """Path of one data segment."""
    return f"{SHM_DIR}/{PREFIX}{pid}-{name}.{slot}.{gen}"


_FILE_RE = re.compile(r"polystore-([0-9]+)-([A-Za-z0-9_][A-Za-z0-9_-]{0,63})\.(ctl|[0-9]+\.[0-9]+)")


def parse_filename(filename: str) -> tuple[int, str, bool] | None:
    """(owner pid, store name, is control segment) of a store's file name, else ``None``."""
    match = _FILE_RE.fullmatch(filename)
    if match is None:
        return None
    return int(match[1]), match[2], match[3] == "ctl"


# -- keys and dtypes ----------------------------------------------------------------


def encode_key(key: object) -> bytes:
    """UTF-8 bytes of a key, refusing what cannot be one."""
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, got {type(key).__name__}: {key!r}")
    data = key.encode("utf-8", "surrogatepass")
    if not data or len(data) > MAX_KEY_BYTES or b"\0" in data:
        shown = repr(key) if len(key) <= 60 else f"{key[:40]!r}... ({len(data)} bytes)"
        raise ValueError(
            f"invalid key {shown}: keys are 1 to {MAX_KEY_BYTES} bytes of UTF-8 without NUL"
        )
    return data


@functools.lru_cache(maxsize=1024)
def encode_dtype(dtype: np.dtype[Any]) -> bytes:
    """A text description of ``dtype`` that :func:`decode_dtype` turns back into it."""
    if dtype.hasobject:
        raise NotShareableError(
            f"arrays of dtype {dtype} hold Python objects, which cannot live in shared memory"
        )
    if dtype.fields is None and dtype.subdtype is None:
        text = dtype.str
    else:
        from numpy.lib import format as npformat

        text = repr(npformat.dtype_to_descr(dtype))
    data = text.encode("utf-8")
    if len(data) > MAX_DTYPE_BYTES:
        raise ValueError(
            f"dtype {dtype} is too complex to store: its description takes {len(data)} "
            f"bytes, at most {MAX_DTYPE_BYTES} fit"
        )
    return data


@functools.lru_cache(maxsize=1024)
def decode_dtype(data: bytes) -> np.dtype[Any]:
    """Inverse of :func:`encode_dtype`."""
    text = data.decode("utf-8")
    if not text.startswith("["):
        return np.dtype(text)
    import ast

    from numpy.lib import format as npformat

    return npformat.descr_to_dtype(ast.literal_eval(text))


# -- processes -------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running process, ``None`` if gone.

    A zombie counts as gone: its memory is released, and it can never again
    drop a pin or finish a write.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces or ')': the
    # fields we want come after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def is_alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``start``."""
    return pid > 0 and start_time(pid) == start


def my_identity() -> tuple[int, int]:
    """(pid, start time) of the calling process."""
    pid = os.getpid()
    start = start_time(pid)
    if start is None:  # pragma: no cover - /proc always shows the caller
        raise OSError(f"cannot read /proc/{pid}/stat")
    return pid, start


def header_of(fd: int) -> list[int] | None:
    """The header slots of an open control segment, ``None`` if it is not one (yet)."""
    raw = os.pread(fd, HEADER_SLOTS * 8, 0)
    if len(raw) < HEADER_SLOTS * 8:
        return None
    slots: list[int] = np.frombuffer(raw, dtype="<i8").tolist()
    if slots[H_MAGIC] != MAGIC or slots[H_VERSION] != VERSION:
        return None
    return slots


def read_header(path: str) -> list[int] | None:
    """The header slots of a control segment file, ``None`` if it is not one (yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return header_of(fd)
    finally:
        os.close(fd)


# -- the tables ----------------------------------------------------------------------------

_EQ = ENT_SIZE // 8  # int64 slots per entry record
_HASH_MASK = 0xFFFFFFFF


class Tables:
    """Typed views of a mapped control segment, and the key index kept in it.

    The methods change shared memory: callers hold the store lock.

    Attributes:
        h, ht, eq, bq, sq: int64 views of the header, hash table, entries,
            blocks and segments; ``eb`` the entries as bytes.
    """

    def __init__(self, mm: mmap.mmap, layout: Layout) -> None:
        self.layout = layout
        self.mask = layout.ht_cap - 1
        off = layout.offsets()
        whole = memoryview(mm)

        def part(section: str) -> memoryview:
            start, length = off[section]
            return whole[start : start + length]

        self.h = part("header").cast("q")
        self.ht = part("ht").cast("q")
        self.eb = part("ent")
        self.eq = self.eb.cast("q")
        self.bq = part("blk").cast("q")
        self.sq = part("seg").cast("q")
        self.pq = part("proc").cast("q")
        self.pins = part("pins").cast("i")
        self._whole = whole
        self.ht_np = np.frombuffer(self.ht, dtype=np.int64)
        self.blk_np = np.frombuffer(self.bq, dtype=np.int64).reshape(layout.max_blocks, -1)
        self.seg_np = np.frombuffer(self.sq, dtype=np.int64).reshape(layout.max_segs, -1)
        self.proc_np = np.frombuffer(self.pq, dtype=np.int64).reshape(layout.max_procs, -1)
        self.pins_np = np.frombuffer(self.pins, dtype=np.int32).reshape(layout.max_procs, -1)
        #: the C view of the segment (polystore._shm_fast), set by the arena
        self.fast: Any = None

    def release_views(self) -> None:
        """Release the views of the tables, as far as nothing else holds them."""
        if self.fast is not None:
            self.fast.release()
            self.fast = None
        del self.ht_np, self.blk_np, self.seg_np, self.proc_np, self.pins_np
        views = (self.h, self.ht, self.eq, self.eb, self.bq, self.sq, self.pq, self.pins)
        for view in (*views, self._whole):
            try:
                view.release()
            except BufferError:
                pass  # exported further: released with the last view of it

    # -- key index ------------------------------------------------------------------------
    # Hash-table slots: 0 empty, -1 deleted, else hash << 32 | (entry + 1).

    def find(self, kbz: bytes, h: int) -> tuple[int, int]:
        """(slot, entry) of a key (``kbz`` is its bytes plus a NUL); entry -1 if absent.

        For an absent key the slot is where :meth:`insert` puts it.
        """
        ht, eb, mask = self.ht, self.eb, self.mask
        n = len(kbz)
        i = h & mask
        v = ht[i]
        if v > 0 and v >> 32 == h:  # the usual case: found at the first probe
            e = (v & _HASH_MASK) - 1
            o = e * ENT_SIZE + E_KEY
            if eb[o : o + n] == kbz:
                return i, e
        tomb = -1
        while True:
            v = ht[i]
            if v == 0:
                return (i if tomb < 0 else tomb), -1
            if v < 0:
                if tomb < 0:
                    tomb = i
            elif v >> 32 == h:
                e = (v & _HASH_MASK) - 1
                o = e * ENT_SIZE + E_KEY
                if eb[o : o + n] == kbz:
                    return i, e
            i = (i + 1) & mask

    def insert(self, i: int, h: int, kb: bytes) -> int:
        """Add a key at slot ``i`` (from :meth:`find`); return its new entry."""
        hdr = self.h
        e = hdr[H_ENT_FREE]
        if e >= 0:
            hdr[H_ENT_FREE] = self.eq[e * _EQ + E_NEXT]
        else:
            e = hdr[H_ENT_HW]
            if e >= self.layout.max_keys:
                raise MemoryError(f"the key index is full (max_keys={self.layout.max_keys})")
            hdr[H_ENT_HW] = e + 1
        o = e * ENT_SIZE + E_KEY
        self.eb[o : o + E_DTYPE - E_KEY] = kb.ljust(E_DTYPE - E_KEY, b"\0")
        self.eq[e * _EQ + E_META] = len(kb)
        if self.ht[i] < 0:
            hdr[H_TOMBS] -= 1
        self.ht[i] = (h << 32) | (e + 1)
        hdr[H_NKEYS] += 1
        return e

    def remove(self, i: int, e: int) -> None:
        """Remove the key in slot ``i`` whose entry is ``e``."""
        hdr, ht = self.h, self.ht
        if ht[(i + 1) & self.mask] == 0:
            ht[i] = 0  # no probe sequence runs through this slot
        else:
            ht[i] = -1
            hdr[H_TOMBS] += 1
        hdr[H_NKEYS] -= 1
        self.eq[e * _EQ + E_NEXT] = hdr[H_ENT_FREE]
        hdr[H_ENT_FREE] = e
        if hdr[H_TOMBS] > self.layout.ht_cap // 4:
            self._rehash()

    def _rehash(self) -> None:
        live = self.ht_np[self.ht_np > 0].tolist()
        self.ht_np[:] = 0
        ht, mask = self.ht, self.mask
        for v in live:
            i = (v >> 32) & mask
            while ht[i]:
                i = (i + 1) & mask
            ht[i] = v
        self.h[H_TOMBS] = 0

    def entries(self) -> list[int]:
        """Entries of every stored key."""
        live = self.ht_np[self.ht_np > 0]
        return ((live & _HASH_MASK) - 1).tolist()

    def key_of(self, e: int) -> str:
        """The key of entry ``e``."""
        o = e * ENT_SIZE + E_KEY
        n = self.eq[e * _EQ + E_META] & 0xFFFF
        return bytes(self.eb[o : o + n]).decode("utf-8", "surrogatepass")

    @staticmethod
    def ht_hash(kb: bytes) -> int:
        """The 31-bit hash of a key's bytes."""
        return zlib.crc32(kb) & 0x7FFFFFFF

    def write_entry(
        self, e: int, b: int, seq: int, nbytes: int, dt: bytes, shape: tuple[int, ...], flags: int
    ) -> None:
        """Describe the value of entry ``e``, put number ``seq``."""
        eq = self.eq
        k = e * _EQ
        o = e * ENT_SIZE + E_DTYPE
        self.eb[o : o + len(dt)] = dt
        first = k + E_SHAPE // 8
        for j, extent in enumerate(shape):
            eq[first + j] = extent
        klen = eq[k + E_META] & 0xFFFF
        eq[k + E_META] = klen | len(shape) << 16 | flags << 24 | len(dt) << 32
        eq[k + E_MSEQ] = seq
        self.write_value(e, b, seq, nbytes)

    def write_value(self, e: int, b: int, seq: int, nbytes: int) -> None:
        """Point entry ``e`` at new bytes of the same dtype, shape and flags."""
        eq = self.eq
        k = e * _EQ
        eq[k + E_BLOCK] = b
        eq[k + E_NBYTES] = nbytes
        eq[k + E_SEQ] = seq

    def read_entry(self, e: int) -> tuple[bytes, tuple[int, ...], int]:
        """(dtype description, shape, flags) of entry ``e``."""
        k = e * _EQ
        meta = self.eq[k + E_META]
        ndim, flags, dlen = (meta >> 16) & 0xFF, (meta >> 24) & 0xFF, (meta >> 32) & 0xFFFF
        o = e * ENT_SIZE + E_DTYPE
        first = k + E_SHAPE // 8
        return bytes(self.eb[o : o + dlen]), tuple(self.eq[first : first + ndim]), flags
