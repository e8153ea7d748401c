"""The shm backend: the conformance suite, plus sharing across processes."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import FileManager, NotShareableError, SharedArrayStore, SharedMemoryBackend
from polystore.base import StorageBackend
from polystore.testing import BackendTests, assert_same_value

# every test with and without the C fast path
pytestmark = pytest.mark.usefixtures("store_paths")


class RawStore:
    """Raw helpers: the backend's shared array store, read and written directly.

    Each file is a key (its absolute path), each directory a key with a
    trailing slash; arrays are stored as arrays, everything else as bytes
    behind a one-byte tag (D directory, S text, B bytes, J JSON, Z npz).
    """

    @staticmethod
    def _store(backend: StorageBackend) -> SharedArrayStore:
        assert isinstance(backend, SharedMemoryBackend)
        store = backend._data.store
        assert isinstance(store, SharedArrayStore)
        return store

    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        try:
            got = self._store(backend).get_value("/" + path)
        except KeyError:
            raise FileNotFoundError(path) from None
        if isinstance(got, np.ndarray):
            return got
        tag, body = got[:1], got[1:]
        if tag == b"S":
            return body.decode("utf-8", "surrogatepass")
        if tag == b"B":
            return body
        if tag == b"Z":
            with np.load(io.BytesIO(body), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        assert tag == b"J", f"{path}: unknown tag {tag!r}"
        return json.loads(body)

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:
        store = self._store(backend)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            store.put_bytes("/" + "/".join(parts[:depth]) + "/", b"D")
        key = "/" + path
        if isinstance(value, np.ndarray):
            store.put(key, value)
        elif isinstance(value, str):
            store.put_bytes(key, b"S" + value.encode("utf-8"))
        elif isinstance(value, bytes):
            store.put_bytes(key, b"B" + value)
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, np.ndarray) for v in value.values())
        ):
            buf = io.BytesIO()
            np.savez(buf, **value)
            store.put_bytes(key, b"Z" + buf.getvalue())
        else:
            store.put_bytes(key, b"J" + json.dumps(value).encode("utf-8"))


class TestSharedMemoryBackend(RawStore, BackendTests):
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


def test_a_backend_over_a_store_in_another_directory_pickles_with_it(tmp_path: Path) -> None:
    with SharedArrayStore(directory=tmp_path) as store:
        backend = SharedMemoryBackend(store)
        backend.save(np.arange(4), "a.npy")
        clone = pickle.loads(pickle.dumps(backend))
        assert clone.array_store.directory == str(tmp_path)
        assert_same_value(clone.load("a.npy"), np.arange(4))
        clone.close()


def test_an_npy_file_loads_as_a_read_only_view_of_the_store() -> None:
    # The shm backend reads .npy files straight from the store; the general
    # way (links, errors, options) must still answer as it did.
    with SharedMemoryBackend() as backend:
        backend.save(np.arange(6.0), "d/saved.npy")
        with backend.create_array("d/made.npy", (6,), np.float64) as out:
            out[:] = 1.0
        backend.create_symlink("d/saved.npy", "d/link.npy")
        for name in ("saved", "made", "link"):
            value = backend.load(f"d/{name}.npy")
            assert not value.flags.writeable
            assert np.shares_memory(value, backend.array_store.get("/d/saved.npy")) == (
                name != "made"
            )
            with pytest.raises(ValueError, match="read-only"):
                value[0] = 5.0
        assert_same_value(backend.load("d/saved.npy", allow_pickle=False), np.arange(6.0))
        with pytest.raises(FileNotFoundError):
            backend.load("d/missing.npy")
        with pytest.raises(IsADirectoryError):
            backend.load("d.npy/../d")
        backend.save("text", "d/odd.npy.txt")
        assert backend.load("d/odd.npy.txt") == "text"
