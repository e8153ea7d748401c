"""Region writes into chunked arrays: which chunks a write shares, their locks, the write.

A zarr chunk is stored as one object, so writing part of a chunk means reading
the whole chunk, changing it and writing it back. Two processes doing that to
the same chunk at once lose one of the two changes. Chunks that a write covers
entirely are never read, and no other writer of a disjoint region touches
them, so they need no lock.

:func:`split_region` cuts a region into the box of chunks it covers entirely
and at most two slabs per dimension made of the chunks it covers only in part.
:class:`ChunkLocks` holds one portalocker (``flock``) lock file per chunk while
a slab is written. A writer holds the locks of one slab at a time and takes
them in sorted order, so two writers can never wait for each other in a cycle.
The kernel releases the locks of a process that dies.

:func:`write_region` puts the two together. Nothing here imports zarr: it
works on shapes, chunk grids and any array that supports slice assignment.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import operator
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from . import locks
from .exceptions import LockRequiredError, LockTimeoutError

__all__ = [
    "Box",
    "ChunkLocks",
    "as_shape",
    "check_layout",
    "chunks_touched",
    "normalize_region",
    "split_region",
    "write_region",
]

#: one ``(start, stop)`` pair per dimension
Box: TypeAlias = "tuple[tuple[int, int], ...]"


def normalize_region(region: Any, shape: Sequence[int]) -> Box:
    """Turn a region given as slices into explicit ``(start, stop)`` pairs.

    ``region`` is a slice or a tuple of slices with step 1 and non-negative
    bounds; ``None`` bounds mean the start or end of the dimension, and
    dimensions left out at the end are taken whole.

    Raises:
        TypeError: an entry is not a slice.
        ValueError: a step is not 1, or a bound lies outside the array.
    """
    entries = (region,) if isinstance(region, slice) else region
    if not isinstance(entries, tuple):
        raise TypeError(f"region must be a slice or a tuple of slices, got {region!r}")
    if len(entries) > len(shape):
        raise ValueError(
            f"region {region!r} has more dimensions than the array shape {tuple(shape)}"
        )
    box = []
    for dim, size in enumerate(shape):
        entry = entries[dim] if dim < len(entries) else slice(None)
        if not isinstance(entry, slice):
            raise TypeError(f"region entries must be slices, got {entry!r} for dimension {dim}")
        if entry.step not in (None, 1):
            raise ValueError(f"region slices must have step 1, got {entry!r} for dimension {dim}")
        start = 0 if entry.start is None else operator.index(entry.start)
        stop = size if entry.stop is None else operator.index(entry.stop)
        if not 0 <= start <= stop <= size:
            raise ValueError(
                f"region {region!r} does not fit the array shape {tuple(shape)} "
                f"in dimension {dim} (need 0 <= start <= stop <= {size})"
            )
        box.append((start, stop))
    return tuple(box)


def split_region(
    box: Box, shape: Sequence[int], grid: Sequence[int]
) -> tuple[Box | None, list[Box]]:
    """Split ``box`` into the part made of whole chunks and the slabs that share chunks.

    Returns ``(inner, slabs)``: ``inner`` covers only chunks that ``box``
    covers entirely (``None`` when there are none) and every slab touches only
    chunks that ``box`` covers in part. Together they cover ``box`` exactly,
    without overlap. A chunk at the end of the array counts as covered when
    the part of it inside the array is.
    """
    if any(start == stop for start, stop in box):
        return None, []
    rest = list(box)
    slabs: list[Box] = []
    for dim, ((start, stop), size, step) in enumerate(zip(box, shape, grid, strict=True)):
        low = -(-start // step) * step
        high = size if stop == size else stop // step * step
        if low >= high:
            # no whole chunk along this dimension: all that is left shares chunks
            slabs.append(tuple(rest))
            return None, slabs
        if start < low:
            slabs.append((*rest[:dim], (start, low), *rest[dim + 1 :]))
        if high < stop:
            slabs.append((*rest[:dim], (high, stop), *rest[dim + 1 :]))
        rest[dim] = (low, high)
    return tuple(rest), slabs


def chunks_touched(box: Box, grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Grid coordinates of the chunks ``box`` touches, in sorted order."""
    ranges = [
        range(start // step, -(-stop // step))
        for (start, stop), step in zip(box, grid, strict=True)
    ]
    return list(itertools.product(*ranges))


class ChunkLocks:
    """Exclusive file locks, one per name, for the chunks of one array.

    Args:
        directory: where the lock files live; created on first use. Every
            writer of the array must see the same directory, on a file system
            whose ``flock`` locks all of them honour (a local disk, or NFSv4
            across machines).
        timeout: seconds to wait for a lock before :class:`LockTimeoutError`.

    Lock files are never removed: deleting a lock file that another process
    is about to open would let two processes hold "the" lock at once.
    """

    def __init__(self, directory: str, timeout: float) -> None:
        self.directory = directory
        self.timeout = timeout

    @staticmethod
    def for_array(base: str, store: str, key: str, timeout: float) -> ChunkLocks:
        """The locks of the array ``key`` in the store ``store``, under ``base``.

        The directory name is a digest of both, so arrays of different stores
        sharing one lock directory never share a lock, and no path is too long.
        """
        digest = hashlib.sha256(f"{store}\0{key}".encode()).hexdigest()[:32]
        return ChunkLocks(os.path.join(base, digest), timeout)

    @contextlib.contextmanager
    def hold(self, names: Sequence[str]) -> Iterator[None]:
        """Hold the locks named ``names`` (taken in sorted order) inside the block.

        Raises:
            LockTimeoutError: a lock was not free within ``timeout`` seconds;
                the locks taken so far are released.
        """
        os.makedirs(self.directory, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        with contextlib.ExitStack() as held:
            for name in sorted(names):
                held.enter_context(
                    self._lock(os.path.join(self.directory, name + ".lock"), deadline)
                )
            yield

    @contextlib.contextmanager
    def _lock(self, path: str, deadline: float) -> Iterator[None]:
        # Chunk lock files stay in place (removable=False): they are few, and
        # one per chunk name however often it is written.
        left = max(0.0, deadline - time.monotonic())
        try:
            fd = locks.acquire(path, left, removable=False)
        except LockTimeoutError:
            raise LockTimeoutError(path, self.timeout) from None
        try:
            yield
        finally:
            locks.release(fd, path, removable=False)


def write_region(
    target: Any, block: np.ndarray[Any, Any], region: Any, locks: ChunkLocks | None, path: str
) -> None:
    """Write ``block`` into ``region`` of the chunked array ``target``.

    Whole chunks are written without locks; each slab of shared chunks under
    the locks of its chunks. ``block`` is broadcast to the region's shape.

    Raises:
        LockRequiredError: some chunks are shared and ``locks`` is ``None``;
            nothing was written.
        ValueError: the region or the block does not fit.
    """
    box = normalize_region(region, target.shape)
    size = tuple(stop - start for start, stop in box)
    try:
        block = np.broadcast_to(block, size)
    except ValueError:
        raise ValueError(
            f"a block of shape {block.shape} does not fit the region {region!r} of "
            f"{path!r}, whose shape is {size}"
        ) from None
    # the unit zarr rewrites whole is the shard when there are shards
    grid = target.shards or target.chunks
    inner, slabs = split_region(box, target.shape, grid)
    if slabs and locks is None:
        raise LockRequiredError(
            path,
            f"region {region!r} covers chunks of shape {grid} only in part, and "
            "fsspec storage has no locks; align the region to the chunks, or pass "
            "lock_dir= a directory all writers share",
        )
    if inner is not None:
        _write(target, inner, box, block)
    for slab in slabs:
        assert locks is not None
        names = ["c." + ".".join(map(str, coords)) for coords in chunks_touched(slab, grid)]
        with locks.hold(names):
            _write(target, slab, box, block)


def _write(target: Any, part: Box, box: Box, block: np.ndarray[Any, Any]) -> None:
    """Write the ``part`` of ``box`` from ``block`` (which holds all of ``box``)."""
    where = tuple(slice(start, stop) for start, stop in part)
    source = tuple(
        slice(a - origin, b - origin) for (a, b), (origin, _) in zip(part, box, strict=True)
    )
    target[where] = block[source]


def as_shape(value: Any, ndim: int | None = None) -> tuple[int, ...]:
    """A shape given as an int (repeated ``ndim`` times) or a sequence, as a tuple."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * (ndim or 1)
    return tuple(int(v) for v in value)


def check_layout(
    target: Any, path: str, shape: Any, dtype: Any, options: Mapping[str, Any]
) -> None:
    """Refuse a region write whose array differs from what the writer asked for.

    Raises:
        ValueError: shape, dtype, chunks or shards differ; the message lists them.
    """
    problems = []
    if shape is not None and as_shape(shape) != tuple(target.shape):
        problems.append(f"shape {tuple(target.shape)}, not {as_shape(shape)}")
    if dtype is not None and np.dtype(dtype) != target.dtype:
        problems.append(f"dtype {target.dtype}, not {np.dtype(dtype)}")
    for name, have in (("chunks", target.chunks), ("shards", target.shards)):
        want = options.get(name)
        if want is not None and want != "auto" and as_shape(want, target.ndim) != have:
            problems.append(f"{name} {have}, not {as_shape(want, target.ndim)}")
    if problems:
        raise ValueError(
            f"the array at {path!r} exists with {', '.join(problems)}; "
            "delete it first, or write with its layout"
        )
