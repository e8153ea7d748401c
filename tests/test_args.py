"""One rule for timeouts, wherever polystore takes one (``polystore._args``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import DiskBackend, SharedArrayStore, file_lock


def _store_put(tmp_path: Path, timeout: Any) -> None:
    with SharedArrayStore() as store:
        store.put("k", np.ones(2), timeout=timeout)


def _file_lock(tmp_path: Path, timeout: Any) -> None:
    with file_lock(tmp_path / "a", timeout=timeout):
        pass


def _disk(tmp_path: Path, timeout: Any) -> None:
    DiskBackend(tmp_path, lock_timeout=timeout)


def _zarr(tmp_path: Path, timeout: Any) -> None:
    pytest.importorskip("zarr")
    from polystore import ZarrBackend

    ZarrBackend(tmp_path, lock_timeout=timeout)


TAKERS: dict[str, Callable[[Path, Any], None]] = {
    "SharedArrayStore.put": _store_put,
    "file_lock": _file_lock,
    "DiskBackend(lock_timeout=)": _disk,
    "ZarrBackend(lock_timeout=)": _zarr,
}


@pytest.mark.parametrize("take", TAKERS.values(), ids=list(TAKERS))
def test_every_timeout_follows_one_rule(take: Callable[[Path, Any], None], tmp_path: Path) -> None:
    for good in (0, 0.5, 2, np.int64(3), np.float32(0.25)):
        take(tmp_path, good)
    for wrong_type in (True, "1", b"1", [1]):
        with pytest.raises(TypeError, match="seconds"):
            take(tmp_path, wrong_type)
    for wrong_value in (-1, -0.5, float("nan")):
        with pytest.raises(ValueError, match=">= 0"):
            take(tmp_path, wrong_value)


@pytest.mark.parametrize(
    "take, allowed", [(_store_put, True), (_file_lock, True), (_disk, True), (_zarr, False)]
)
def test_none_means_no_limit_where_it_is_allowed(
    take: Callable[[Path, Any], None], allowed: bool, tmp_path: Path
) -> None:
    if allowed:
        take(tmp_path, None)
    else:
        with pytest.raises(TypeError, match="seconds"):
            take(tmp_path, None)
