"""The shm backend: the conformance suite, plus sharing across processes."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator

import numpy as np
import pytest

from polystore import FileManager, NotShareableError, SharedMemoryBackend
from polystore.testing import BackendTests, assert_same_value

# every test with and without the C fast path
pytestmark = pytest.mark.usefixtures("store_paths")


class TestSharedMemoryBackend(BackendTests):
    @pytest.fixture
    def backend(self) -> Iterator[SharedMemoryBackend]:
        with SharedMemoryBackend() as backend:
            yield backend


def _child_saves(backend: SharedMemoryBackend) -> None:
    backend.save(np.arange(1000, dtype=np.float64), "from_child/a.npy", metadata={"who": "child"})
    backend.save("hello", "from_child/b.txt")
    backend.close()


@pytest.mark.timeout(60)
def test_child_writes_parent_reads(mp_context: multiprocessing.context.BaseContext) -> None:
    with SharedMemoryBackend() as backend:
        proc = mp_context.Process(target=_child_saves, args=(backend,))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert backend.list_files("from_child") == ["from_child/a.npy", "from_child/b.txt"]
        assert_same_value(backend.load("from_child/a.npy"), np.arange(1000, dtype=np.float64))
        assert backend.load_metadata("from_child/a.npy") == {"who": "child"}
        assert backend.load("from_child/b.txt") == "hello"


def test_pickles_small() -> None:
    with SharedMemoryBackend() as backend:
        backend.save(np.zeros((1000, 1000)), "big.npy")
        blob = pickle.dumps(FileManager({"shm": backend}))
        assert len(blob) < 1024
        clone = pickle.loads(blob).get_backend("shm")
        assert np.shares_memory(clone.load("big.npy"), backend.load("big.npy"))
        clone.close()
        assert backend.is_file("big.npy"), "closing an attached copy keeps the store"


def test_other_node_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with SharedMemoryBackend() as backend:
        blob = pickle.dumps(backend)
        monkeypatch.setenv("POLYSTORE_NODE_ID", "some-other-machine")
        remote = pickle.loads(blob)
        with pytest.raises(NotShareableError, match="node"):
            remote.save(np.ones(1), "x.npy")


def test_object_arrays_are_refused_even_with_allow_pickle() -> None:
    with SharedMemoryBackend() as backend, pytest.raises(ValueError, match="object"):
        backend.save(np.array([None], dtype=object), "o.npy", allow_pickle=True)
