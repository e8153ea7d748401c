"""The conformance suite itself: it catches a backend that is wrong in a self-consistent way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_disk

from polystore import DiskBackend, MemoryBackend


class _MirroredDisk(DiskBackend):
    """Stores arrays reversed and reverses them back on load: consistent with itself only."""

    def save(self, data: Any, path: Any, **kwargs: Any) -> None:
        if isinstance(data, np.ndarray) and data.ndim:
            data = data[::-1]
        super().save(data, path, **kwargs)

    def load(self, path: Any, **kwargs: Any) -> Any:
        value = super().load(path, **kwargs)
        return value[::-1] if isinstance(value, np.ndarray) and value.ndim else value


def test_raw_helpers_catch_a_self_consistent_backend(tmp_path: Path) -> None:
    suite = test_disk.TestDiskBackend()
    backend = _MirroredDisk(tmp_path)
    suite.test_overwrite_replaces(backend)  # checked against itself, it passes
    with pytest.raises(AssertionError):
        suite.test_saved_values_land_in_the_storage(backend, ".npy")
    with pytest.raises(AssertionError):
        suite.test_loads_what_the_storage_holds(backend, ".npy")


def test_capabilities_live_on_the_backend(tmp_path: Path) -> None:
    disk, memory = DiskBackend(tmp_path), MemoryBackend()
    assert {".npy", ".npz", ".json", ".txt", ".bin"} <= disk.extensions == memory.extensions
    assert disk.shareable and not memory.shareable
    assert disk.supports_metadata and not disk.arrays_under_any_name


def test_testing_without_pytest_names_the_install_command(run_python: Any) -> None:
    result = run_python(
        """
        import sys
        sys.modules["pytest"] = None  # as if pytest were not installed
        from polystore.exceptions import MissingDependencyError
        try:
            import polystore.testing
        except MissingDependencyError as exc:
            print(exc)
        """
    )
    assert "pip install 'polystore[test]'" in result.stdout
    assert "pytest" in result.stdout
