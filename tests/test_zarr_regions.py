"""Region writes into zarr arrays: the chunk arithmetic, the locks, and many writers at once."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polystore._zarr_regions import ChunkLocks, chunks_touched, normalize_region, split_region
from polystore.exceptions import LockTimeoutError
from polystore.zarr_backend import ZarrBackend

zarr = pytest.importorskip("zarr", minversion="3")

SHAPE = (100, 100)
CHUNKS = (16, 16)
#: six row bands, each boundary inside a chunk, so neighbours share chunks
ROW_EDGES = (0, 17, 33, 50, 67, 83, 100)
#: each band is written in three pieces whose edges are unaligned too
COL_EDGES = (0, 37, 71, 100)
ROUNDS = 4
REPEATS = 3


# -- chunk arithmetic ----------------------------------------------------------------


@st.composite
def boxes(draw: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 40)) for _ in range(ndim))
    grid = tuple(draw(st.integers(1, 12)) for _ in range(ndim))
    box = []
    for size in shape:
        start = draw(st.integers(0, size))
        box.append((start, draw(st.integers(start, size))))
    return tuple(box), shape, grid


def _cells(box: Any) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(a, b) for a, b in box)))


def _chunk_is_covered(chunk: tuple[int, ...], box: Any, shape: Any, grid: Any) -> bool:
    return all(
        start <= c * g and min((c + 1) * g, size) <= stop
        for c, (start, stop), size, g in zip(chunk, box, shape, grid, strict=True)
    )


@given(boxes())
def test_split_region_partitions_the_box(case: Any) -> None:
    box, shape, grid = case
    inner, slabs = split_region(box, shape, grid)
    parts = ([inner] if inner is not None else []) + slabs
    cells = [_cells(part) for part in parts]
    assert sum(len(c) for c in cells) == len(_cells(box))  # no overlap
    assert set().union(*cells) == _cells(box)  # nothing missed
    if inner is not None:
        assert all(_chunk_is_covered(c, box, shape, grid) for c in chunks_touched(inner, grid))
    for slab in slabs:
        assert not any(_chunk_is_covered(c, box, shape, grid) for c in chunks_touched(slab, grid))


def test_split_region_examples() -> None:
    # aligned, and ending at the array's edge inside a chunk: no slab
    assert split_region(((0, 32), (16, 100)), SHAPE, CHUNKS) == (((0, 32), (16, 100)), [])
    # one unaligned edge: the slab is the partial chunk row
    assert split_region(((0, 17), (0, 100)), SHAPE, CHUNKS) == (
        ((0, 16), (0, 100)),
        [((16, 17), (0, 100))],
    )
    # inside a single chunk: all of it is one slab
    assert split_region(((3, 9),), (100,), (16,)) == (None, [((3, 9),)])
    assert split_region(((5, 5),), (100,), (16,)) == (None, [])


def test_normalize_region() -> None:
    assert normalize_region(slice(2, None), (10, 4)) == ((2, 10), (0, 4))
    assert normalize_region((slice(None), slice(1, 3)), (10, 4)) == ((0, 10), (1, 3))
    for bad, error in [
        ((slice(0, 11),), ValueError),
        ((slice(-1, None),), ValueError),
        ((slice(0, 4, 2),), ValueError),
        ((slice(0, 1),) * 3, ValueError),
        ((1, slice(None)), TypeError),
        ([slice(None)], TypeError),
    ]:
        with pytest.raises(error):
            normalize_region(bad, (10, 4))


# -- one writer ------------------------------------------------------------------------


@pytest.fixture
def backend(tmp_path: Path) -> ZarrBackend:
    return ZarrBackend(tmp_path)


def _lock_files(root: Path) -> list[str]:
    locks = root / ".polystore-zarr" / "locks"
    return sorted(p.name for p in locks.rglob("*.lock")) if locks.exists() else []


def test_aligned_regions_take_no_chunk_locks(backend: ZarrBackend, tmp_path: Path) -> None:
    for r0, c0 in itertools.product(range(0, 100, 32), range(0, 100, 48)):
        block = np.full((min(32, 100 - r0), min(48, 100 - c0)), r0 + c0, np.int32)
        region = (slice(r0, r0 + block.shape[0]), slice(c0, c0 + block.shape[1]))
        backend.save(block, "t.npy", region=region, shape=SHAPE, dtype="int32", chunks=CHUNKS)
    assert _lock_files(tmp_path) == ["create.lock"]
    result = backend.load("t.npy")
    assert result[40, 50] == 32 + 48 and result[99, 99] == 96 + 96


def test_unaligned_regions_lock_the_shared_chunks(backend: ZarrBackend, tmp_path: Path) -> None:
    block = np.ones((10, 100), np.int32)
    backend.save(block, "t.npy", region=(slice(20, 30),), shape=SHAPE, dtype="int32", chunks=CHUNKS)
    # rows 20..30 lie in chunk row 1; all seven chunks of that row are shared
    assert set(_lock_files(tmp_path)) == {"create.lock"} | {f"c.1.{j}.lock" for j in range(7)}
    assert backend.load("t.npy").sum() == 1000


def test_first_write_creates_with_metadata(backend: ZarrBackend) -> None:
    block = np.ones((4, 4), np.uint8)
    backend.save(block, "m", region=(slice(0, 4), slice(0, 4)), shape=(8, 8), metadata={"a": 1})
    assert backend.load_metadata("m") == {"a": 1}
    assert backend.load("m").dtype == np.uint8  # the block's dtype when none is given
    backend.save(block, "m", region=(slice(4, 8), slice(4, 8)), metadata={"b": 2})
    assert backend.load_metadata("m") == {"a": 1, "b": 2}
    assert backend.load("m").sum() == 32


def test_region_errors(backend: ZarrBackend) -> None:
    kw: dict[str, Any] = {"shape": (8, 8), "dtype": "float64", "chunks": (4, 4)}
    backend.save(np.ones((2, 8)), "r", region=(slice(0, 2),), **kw)
    with pytest.raises(FileNotFoundError, match="shape="):
        backend.save(np.ones(2), "missing", region=(slice(0, 2),))
    with pytest.raises(ValueError, match="shape"):
        backend.save(np.ones((2, 8)), "r", region=(slice(0, 2),), **dict(kw, shape=(9, 8)))
    with pytest.raises(ValueError, match="dtype"):
        backend.save(np.ones((2, 8)), "r", region=(slice(0, 2),), **dict(kw, dtype="int8"))
    with pytest.raises(ValueError, match="chunks"):
        backend.save(np.ones((2, 8)), "r", region=(slice(0, 2),), **dict(kw, chunks=(2, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        backend.save(np.ones((3, 8)), "r", region=(slice(0, 2),))
    with pytest.raises(ValueError, match="overwrite"):
        backend.save(np.ones((2, 8)), "r", region=(slice(0, 2),), overwrite=False)
    with pytest.raises(TypeError, match="region"):
        backend.save(np.ones((2, 8)), "r", shape=(8, 8))
    backend.ensure_directory("group")
    with pytest.raises(IsADirectoryError):
        backend.save(np.ones(2), "group", region=(slice(0, 2),), shape=(4,))
    np.testing.assert_array_equal(backend.load("r")[:2], np.ones((2, 8)))


def test_broadcast_block(backend: ZarrBackend) -> None:
    backend.save(np.float32(7), "b", region=(slice(2, 5),), shape=(6,), chunks=(3,))
    np.testing.assert_array_equal(backend.load("b"), [0, 0, 7, 7, 7, 0])


def test_shards_are_the_unit_of_locking(tmp_path: Path) -> None:
    backend = ZarrBackend(tmp_path)
    block = np.ones((4, 16), np.int16)
    opts: dict[str, Any] = {"shape": (32, 16), "chunks": (4, 16), "shards": (16, 16)}
    # aligned to the chunks, not to the shards: the whole shard is rewritten
    backend.save(block, "s", region=(slice(4, 8),), **opts)
    assert "c.0.0.lock" in _lock_files(tmp_path)
    assert backend.load("s").sum() == 64


def test_lock_timeout(backend: ZarrBackend, tmp_path: Path) -> None:
    backend.save(np.ones(8), "t", region=(slice(0, 8),), shape=(16,), chunks=(8,))
    hasty = ZarrBackend(tmp_path, lock_timeout=0.2)
    locks = str(tmp_path / ".polystore-zarr" / "locks")
    holder = ChunkLocks.for_array(locks, str(tmp_path), "t", 1)
    with holder.hold(["c.1"]), pytest.raises(LockTimeoutError):
        hasty.save(np.ones(3), "t", region=(slice(9, 12),))
    hasty.save(np.ones(3), "t", region=(slice(9, 12),))
    assert backend.load("t").sum() == 11


# -- many writers ----------------------------------------------------------------------


def _value(round_: int, band: int, piece: int, repeat: int) -> int:
    return 1000 * round_ + 100 * repeat + 10 * band + piece + 1


def _write_bands(backend: ZarrBackend, band: int, barrier: Any, report: str) -> None:
    """One worker: its row band of every round's array, in pieces, several times."""
    lo, hi = ROW_EDGES[band], ROW_EDGES[band + 1]
    created = []
    for round_ in range(ROUNDS):
        barrier.wait(60)  # all six start each round together and race to create
        for repeat in range(REPEATS):
            for piece, (c0, c1) in enumerate(itertools.pairwise(COL_EDGES)):
                block = np.full((hi - lo, c1 - c0), _value(round_, band, piece, repeat), np.int32)
                backend.save(
                    block,
                    f"round{round_}.npy",
                    region=(slice(lo, hi), slice(c0, c1)),
                    shape=SHAPE,
                    dtype="int32",
                    chunks=CHUNKS,
                    metadata={"round": round_},
                )
            if repeat == 0:
                # the array's metadata file as this writer saw it right after writing
                st = os.stat(os.path.join(str(backend.root), f"round{round_}.npy", "zarr.json"))
                created.append([st.st_ino, st.st_mtime_ns])
    with open(report, "w") as f:
        json.dump(created, f)


def _expected(round_: int) -> np.ndarray[Any, Any]:
    out = np.zeros(SHAPE, np.int32)
    for band, (lo, hi) in enumerate(itertools.pairwise(ROW_EDGES)):
        for piece, (c0, c1) in enumerate(itertools.pairwise(COL_EDGES)):
            out[lo:hi, c0:c1] = _value(round_, band, piece, REPEATS - 1)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_six_processes_writing_shared_chunks_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    backend = ZarrBackend(tmp_path)  # crosses to the workers as configuration
    barrier = ctx.Barrier(6)
    reports = [str(tmp_path.parent / f"{tmp_path.name}-worker{band}.json") for band in range(6)]
    workers = [
        ctx.Process(target=_write_bands, args=(backend, band, barrier, reports[band]))
        for band in range(6)
    ]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join(100)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
    assert [w.exitcode for w in workers] == [0] * 6
    seen = [json.loads(Path(r).read_text()) for r in reports]
    for round_ in range(ROUNDS):
        np.testing.assert_array_equal(backend.load(f"round{round_}.npy"), _expected(round_))
        # racing first writers created the array once: nobody rewrote its metadata
        assert len({tuple(s[round_]) for s in seen}) == 1
        assert backend.load_metadata(f"round{round_}.npy") == {"round": round_}
    assert backend.list_dir(".") == [f"round{r}.npy" for r in range(ROUNDS)]
