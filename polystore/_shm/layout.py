"""Where a :class:`~polystore.SharedArrayStore` keeps its bytes: files, header, tables.

Files
-----
A store named ``N`` whose owner is process ``P`` lives in its directory
(``/dev/shm`` unless the store was given another) as

* ``polystore-P-N.ctl``: the control segment (header, undo journal, key
  index, segment, process, entry and block tables, pin counts), mapped by
  every attached process;
* ``polystore-P-N.S.G``: data segment number ``S`` in its ``G``-th incarnation.

Every name starts with ``polystore-<owner pid>-``, which is how ``python -m
polystore gc`` and the test suite tell whose segments they are.

Control segment
---------------
A header of int64 slots (``H_*``), then tables sized by the store's
configuration, each page aligned, in this order:

* ``log``: the undo journal, :data:`LOG_RECORDS` pairs (int64 index into the
  segment, old value) of the locked section under way (see
  :mod:`polystore._shm.tables`);
* ``ht``: open-addressing hash table with linear probing, one int64 per slot:
  ``0`` empty, else ``hash << 32 | (entry + 1)``;
* ``seg``: one record of int64 fields ``S_*`` per data segment;
* ``proc``: one record of int64 fields ``P_*`` per attached process;
* ``ent``: one :data:`ENT_SIZE`-byte record per stored key (int64 fields
  ``E_*``, then the key, the dtype description and the shape);
* ``blk``: one record of int64 fields ``B_*`` per data block;
* ``pins``: int32 ``[proc, block]``: how many views each process holds. Only
  the process of a row writes it (the reaper too, once that process is dead),
  so a view is pinned and unpinned without the store lock; a block is in use
  while any row of the first ``H_PROC_HW`` counts it.

The sections up to ``proc`` are backed by memory when the store is created;
``ent``, ``blk`` and ``pins`` are backed in chunks as they are first used
(``H_*_BACKED``), always before anything writes there, so that a full file
system gives :class:`~polystore.ShmFullError` and never SIGBUS.

Readers do not take the store lock (see ``H_WSEQ``): every locked section
makes the counter odd on entry and even on exit, and a reader checks that it
was even and unchanged around what it read.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from typing import Any, NamedTuple

import numpy as np

from ..exceptions import NotShareableError

#: where stores live unless told otherwise (``directory=`` or :data:`DIR_ENV`)
SHM_DIR = "/dev/shm"
#: environment variable naming the default directory of new stores
DIR_ENV = "POLYSTORE_SHM_DIR"
PREFIX = "polystore-"
MAGIC = int.from_bytes(b"PLYSTOR1", "little")
VERSION = 4
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
H_LOG_LEN = 22  # records in the undo journal; 0 when no locked section is half done
H_CREATED = 23  # wall-clock seconds
H_WSEQ = 24  # odd while a process holds the store lock; bumped on entry and exit
H_PROC_HW = 25  # rows [0, hw) of the process table have been used
H_ENT_BACKED = 26  # entries [0, n) have memory behind them
H_BLK_BACKED = 27  # block records and their pin columns [0, n) likewise
H_ROWS_BACKED = 28  # pin rows [0, n) likewise (for the first H_BLK_BACKED blocks)
H_UNLINK_N = 29  # segment files to unlink once the section that dropped them commits
H_SPILLED = 30  # bytes of data segments spilled to the spill directory (not in H_TOTAL)
H_SPILL_LEN = 31  # bytes of the spill directory's path, stored from H_SPILL_DIR on
H_SPILL_DIR = 256
MAX_SPILL_DIR_BYTES = 1024
H_CLASS0 = 64  # free-list head of every size class
H_UNLINK0 = 384  # (segment, generation) pairs of those files
MAX_UNLINK = 64
HEADER_SLOTS = 512
LOG_RECORDS = 16384  # undo records one locked section may write before it commits

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

SEG_FIELDS = 9
S_STATE, S_GEN, S_SIZE, S_CLS, S_NBLK, S_USED, S_OWNER, S_STAMP, S_SPILL = range(SEG_FIELDS)
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
assert H_CLASS0 + N_CLASSES <= H_SPILL_DIR  # the free-list heads fit in the header
assert H_SPILL_DIR + MAX_SPILL_DIR_BYTES // 8 <= H_UNLINK0
assert H_UNLINK0 + 2 * MAX_UNLINK <= HEADER_SLOTS


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
            ("log", LOG_RECORDS * 16),
            ("ht", self.ht_cap * 8),
            ("seg", self.max_segs * SEG_FIELDS * 8),
            ("proc", self.max_procs * PROC_FIELDS * 8),
            ("ent", self.max_keys * ENT_SIZE),
            ("blk", self.max_blocks * BLK_FIELDS * 8),
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
        """Bytes of the whole control segment (sparse: see :attr:`fixed_size`)."""
        return self.offsets()["end"][0]

    @property
    def fixed_size(self) -> int:
        """Bytes at the start of the control segment that are backed at creation."""
        return self.offsets()["ent"][0]


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


def default_dir() -> str:
    """The directory of stores not given one: :data:`DIR_ENV`, else :data:`SHM_DIR`."""
    return os.environ.get(DIR_ENV) or SHM_DIR


def check_dir(directory: object) -> str:
    """The absolute path of a directory that can hold stores, else raise.

    Raises:
        TypeError: not a str or path.
        NotADirectoryError: it is not an existing directory.
    """
    if directory is None:
        directory = default_dir()
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or path, got {type(directory).__name__}")
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"{path!r} is not a directory: shared array stores need one on a "
            f"memory-backed or local file system (set directory= or {DIR_ENV})"
        )
    return path


def ctl_path(directory: str, pid: int, name: str) -> str:
    """Path of a store's control segment."""
    return f"{directory}/{PREFIX}{pid}-{name}.ctl"


def seg_path(directory: str, pid: int, name: str, slot: int, gen: int) -> str:
    """Path of one data segment."""
    return f"{directory}/{PREFIX}{pid}-{name}.{slot}.{gen}"


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


#: every dtype text :func:`decode_dtype` decoded (or :func:`encode_dtype` made),
#: up to 1,024 of them; the C read path looks up here the dtype of a value it
#: meets for the first time
DTYPES: dict[bytes, np.dtype[Any]] = {}


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
    if dtype.fields is None and dtype.subdtype is None and len(DTYPES) < 1024:
        # What decode_dtype() would make of it (a process reads what it
        # wrote in C at once); not `dtype` itself, which may carry metadata.
        DTYPES.setdefault(data, np.dtype(text))
    return data


def decode_dtype(data: bytes) -> np.dtype[Any]:
    """Inverse of :func:`encode_dtype`."""
    found = DTYPES.get(data)
    if found is not None:
        return found
    text = data.decode("utf-8")
    if not text.startswith("["):
        dtype = np.dtype(text)
    else:
        import ast

        from numpy.lib import format as npformat

        dtype = npformat.descr_to_dtype(ast.literal_eval(text))
    if len(DTYPES) < 1024:
        DTYPES[data] = dtype
    return dtype


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


def spill_dir_of(header: Any) -> str | None:
    """The spill directory recorded in a store's header (int64 slots), if any."""
    n = header[H_SPILL_LEN]
    if not 0 < n <= MAX_SPILL_DIR_BYTES:
        return None
    words = [header[H_SPILL_DIR + j] for j in range(-(-n // 8))]
    raw = np.array(words, dtype="<i8").tobytes()[:n]
    return raw.decode("utf-8", "surrogateescape")


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
