"""What a user of the original polystore relies on, kept working (issue 15)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import polystore
from polystore import BackendNotFoundError, BackendRegistry, FileManager, MemoryBackend


@pytest.fixture
def fm() -> Iterator[FileManager]:
    with BackendRegistry() as registry:
        yield FileManager(registry)


# -- 1: the original's error name --------------------------------------------------
def test_storage_resolution_error_is_importable_and_caught() -> None:
    from polystore import StorageResolutionError
    from polystore.exceptions import StorageResolutionError as same

    assert StorageResolutionError is same is BackendNotFoundError
    assert "StorageResolutionError" in polystore.__all__
    with pytest.raises(StorageResolutionError, match="dsik"):
        FileManager(BackendRegistry()).load("x.npy", "dsik")
