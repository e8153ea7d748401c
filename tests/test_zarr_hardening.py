"""Zarr: an array at the root of a store, zarr v2 stores, and a full disk during a save."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore.zarr_backend import ZarrBackend

zarr = pytest.importorskip("zarr", minversion="3")

ROWS, COLS = 8, 6


def write_band(path: str, row: int) -> None:
    """Worker: write one row of a root array, creating the array if it is the first."""
    ZarrBackend().save(
        np.full((1, COLS), row, dtype=np.int32),
        path,
        region=(slice(row, row + 1), slice(0, COLS)),
        shape=(ROWS, COLS),
        dtype="int32",
        chunks=(1, COLS),
    )


def test_region_writes_at_the_root_of_a_store(tmp_path: Path) -> None:
    # What zarr.open_array("out.zarr") makes: the store is the array itself.
    path = str(tmp_path / "out.zarr")
    for row in range(ROWS):
        write_band(path, row)
    expected = np.repeat(np.arange(ROWS, dtype=np.int32)[:, None], COLS, axis=1)
    backend = ZarrBackend()
    assert backend.kind(path) == "file"
    np.testing.assert_array_equal(backend.load(path), expected)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], expected)


def test_a_root_array_saved_whole_refuses_a_second_creation(tmp_path: Path) -> None:
    path = str(tmp_path / "whole.zarr")
    backend = ZarrBackend()
    backend.save(np.arange(3), path, overwrite=False)
    with pytest.raises(FileExistsError):
        backend.save(np.arange(3), path, overwrite=False)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], np.arange(3))


@pytest.mark.timeout(120)
def test_racing_processes_create_a_root_array_once(tmp_path: Path) -> None:
    path = str(tmp_path / "raced.zarr")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=context) as pool:
        for job in [pool.submit(write_band, path, row) for row in range(ROWS)]:
            job.result(timeout=100)
    expected = np.repeat(np.arange(ROWS, dtype=np.int32)[:, None], COLS, axis=1)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], expected)


def test_reads_zarr_v2_stores(tmp_path: Path) -> None:
    # Written by zarr itself in the format older tools use.
    zarr.save_array(str(tmp_path / "single.zarr"), np.arange(6).reshape(2, 3), zarr_format=2)
    group = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
    group.create_array("A/1", data=np.ones(4), attributes={"channel": "DAPI"})
    backend = ZarrBackend()  # writes v3, reads both
    np.testing.assert_array_equal(
        backend.load(tmp_path / "single.zarr"), np.arange(6).reshape(2, 3)
    )
    plate = tmp_path / "plate.zarr"
    assert backend.is_dir(plate / "A") and backend.is_file(plate / "A/1")
    assert backend.list_files(plate, recursive=True) == [f"{plate}/A/1"]
    assert backend.load_metadata(plate / "A/1") == {"channel": "DAPI"}
    np.testing.assert_array_equal(ZarrBackend(plate).load("A/1"), np.ones(4))
    backend.save(np.zeros(2), plate / "A/1", region=(slice(0, 2),))
    np.testing.assert_array_equal(backend.load(plate / "A/1"), [0, 0, 1, 1])
    assert zarr.open_array(str(plate / "A/1"), mode="r").metadata.zarr_format == 2


def test_a_full_disk_stops_every_write_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = zarr.storage.LocalStore._set
    started: list[str] = []

    async def fill_up(self: Any, key: str, value: Any, exclusive: bool = False) -> None:
        started.append(key)
        if len(started) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        await asyncio.sleep(0.01)  # the other writes are still running when one fails
        await original(self, key, value, exclusive=exclusive)

    backend = ZarrBackend(tmp_path)
    backend.save(np.ones(1), "keep")  # the hierarchy exists: only the new array is at stake
    monkeypatch.setattr(zarr.storage.LocalStore, "_set", fill_up)
    with pytest.raises(OSError) as info:
        backend.save(np.arange(4096), "big", chunks=(64,))
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value, zarr.errors.BaseZarrError)
    written = len(started)
    time.sleep(0.3)  # anything still writing would show up now
    assert len(started) == written, "writes went on after save() raised"
    staging = tmp_path / ".polystore-zarr" / "tmp"
    assert list(staging.iterdir()) == []
    assert not backend.exists("big")
