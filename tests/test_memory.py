"""The memory backend: the conformance suite plus what is specific to it."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from polystore import MemoryBackend, NotShareableError
from polystore.base import StorageBackend
from polystore.memory import ShmRef
from polystore.testing import BackendTests


class RawMapping:
    """Raw helpers for a MemoryBackend: its mapping, read and written directly.

    The mapping holds each file under its absolute POSIX path, each directory
    under its path with a trailing slash (value ``None``), and large arrays as
    a ``ShmRef`` into a shared-memory store.
    """

    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        assert isinstance(backend, MemoryBackend)
        try:
            value = backend._data["/" + path]
        except KeyError:
            raise FileNotFoundError(path) from None
        if isinstance(value, ShmRef):
            return backend._store_for(value.store).get(value.key)
        return value

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:
        assert isinstance(backend, MemoryBackend)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            backend._data["/" + "/".join(parts[:depth]) + "/"] = None
        backend._data["/" + path] = value.copy() if isinstance(value, np.ndarray) else value


class TestMemoryBackend(RawMapping, BackendTests):
    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        with MemoryBackend() as backend:
            yield backend


def test_virtual_root_paths() -> None:
    backend = MemoryBackend()
    backend.save(np.ones(2), "a/b.npy")
    assert backend.is_file("/a/b.npy")
    assert backend.is_file("a/./b.npy")
    assert backend.is_file("../../a/b.npy")
    assert backend.is_file("/a/c/../b.npy")
    assert backend.list_files("/", recursive=True) == ["/a/b.npy"]
    assert backend.is_dir("/") and backend.is_dir(".")


def test_local_backend_refuses_pickling() -> None:
    with pytest.raises(NotShareableError, match="Manager"):
        pickle.dumps(MemoryBackend())


def test_loaded_arrays_are_read_only_views() -> None:
    backend = MemoryBackend()
    backend.save(np.arange(4), "a.npy")
    first, second = backend.load("a.npy"), backend.load("a.npy")
    assert not first.flags.writeable
    assert np.shares_memory(first, second)
    with pytest.raises(ValueError):
        first[0] = 1


def test_root_cannot_be_deleted() -> None:
    backend = MemoryBackend()
    with pytest.raises(PermissionError):
        backend.delete("/", recursive=True)


def test_rejects_non_mapping() -> None:
    with pytest.raises(TypeError):
        MemoryBackend(shared_dict=[1, 2])  # type: ignore[arg-type]
