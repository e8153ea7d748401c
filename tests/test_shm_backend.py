"""The shm backend: the conformance suite, plus sharing across processes."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import FileManager, NotShareableError, SharedArrayStore, SharedMemoryBackend
from polystore.base import StorageBackend
from polystore.exceptions import MetadataNotFoundError
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


# -- a file and its metadata change in one step -----------------------------------------


def _killed_at(step: int, work: Any) -> int:
    """Run ``work()`` in a forked child that SIGKILLs itself at fault step ``step``.

    Returns the steps the child counted when it did not die (``step=-1``: count).
    """
    import os
    import struct

    from polystore._shm import faults

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            faults.arm(step)
            work()
            os.write(w, struct.pack("q", faults.arm(0)))
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    data = os.read(r, 8)
    os.close(r)
    return struct.unpack("q", data)[0] if data else 0


def _file_and_metadata(backend: SharedMemoryBackend, path: str) -> tuple[Any, Any]:
    """(version in the file, version in its metadata); None for what is missing."""
    from polystore.exceptions import MetadataNotFoundError

    version = int(backend.load(path)[0]) if backend.exists(path) else None
    try:
        meta = backend.load_metadata(path)["v"]
    except (MetadataNotFoundError, FileNotFoundError):
        meta = None
    return version, meta


def _save(version: int, meta: bool) -> Any:
    def run(backend: SharedMemoryBackend) -> None:
        value = np.full(50_000, version)  # 400 KB: copied outside the lock
        backend.save(value, "d/f.npy", metadata={"v": version} if meta else None)

    return run


def _create(backend: SharedMemoryBackend) -> None:
    with backend.create_array("d/f.npy", 50_000, np.int64, metadata={"v": 2}) as out:
        out[:] = 2


def _delete(backend: SharedMemoryBackend) -> None:
    backend.delete("d/f.npy")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name, op, outcomes",
    [
        ("save with metadata", _save(2, True), [(1, 1), (2, 2)]),
        ("save without", _save(2, False), [(1, 1), (2, None)]),
        ("create_array with metadata", _create, [(1, 1), (2, 2)]),
        ("delete", _delete, [(1, 1), (None, None)]),
    ],
)
def test_a_kill_leaves_a_file_with_its_own_metadata(name: str, op: Any, outcomes: list) -> None:
    """Killed at any step, a write leaves the old file and metadata or the new file and metadata.

    As on disk (a file and its sidecar commit together): the store puts the
    file, its metadata and its new directories in one locked section.
    """
    with SharedMemoryBackend() as backend:
        steps = 0
        for at in range(-1, 10_000):
            if at == 0:
                continue
            if at > steps:
                break
            if backend.exists("d"):
                backend.delete("d", recursive=True)
            _save(1, True)(backend)
            counted = _killed_at(at, lambda: op(backend))
            if at == -1:
                steps = counted
                assert steps > 3, "no step counted"
                assert _file_and_metadata(backend, "d/f.npy") == outcomes[1]
                continue
            got = _file_and_metadata(backend, "d/f.npy")
            assert got in outcomes, f"{name}, killed at step {at} of {steps}: {got}"


def test_create_array_finds_the_missing_directories_when_it_publishes() -> None:
    """A directory removed while the array is being filled is made again with the file."""
    with SharedMemoryBackend() as backend:
        backend.ensure_directory("d/e")
        with backend.create_array("d/e/f.npy", 4, np.int64, metadata={"v": 1}) as out:
            out[:] = 1
            backend.delete("d", recursive=True)  # (another process could do this)
        assert backend.list_dir("d/e") == ["f.npy"] and backend.kind("d") == "dir"
        assert backend.load_metadata("d/e/f.npy") == {"v": 1}
        with pytest.raises(ValueError), backend.create_array("d/g.npy", 4, np.int64) as out:
            raise ValueError  # abandoned: neither the file nor a directory appears
        assert backend.list_dir("d") == ["e"]


def test_a_move_is_a_rename_of_the_stores_keys() -> None:
    """No copy: the view read before the move is the value at the destination."""
    with SharedMemoryBackend() as backend:
        backend.save(np.arange(1 << 20), "a/f.npy", metadata={"v": 1})
        before = backend.load("a/f.npy")
        mapped = backend._shm.stats()["mapped_bytes"]
        backend.move("a/f.npy", "b/c/g.npy")
        after = backend.load("b/c/g.npy")
        assert np.shares_memory(before, after) and backend.load_metadata("b/c/g.npy") == {"v": 1}
        assert not backend.exists("a/f.npy") and backend.list_dir("b") == ["c"]
        assert backend._shm.stats()["mapped_bytes"] == mapped
        backend.save(np.zeros(3), "a/h.npy")  # no metadata: the destination's goes
        backend.move("a/h.npy", "b/c/g.npy")
        with pytest.raises(MetadataNotFoundError):
            backend.load_metadata("b/c/g.npy")
        backend.save(np.ones(2), "a/i.npy")
        with pytest.raises(FileExistsError):
            backend.move("a/i.npy", "b/c/g.npy", overwrite=False)
        with pytest.raises(FileNotFoundError):
            backend.move("a/missing.npy", "b/x.npy")
        backend.save({"k": 1}, "a/j.json")  # another format: converted the general way
        with pytest.raises(Exception):  # noqa: B017 - whatever the format refuses
            backend.move("a/j.json", "b/j.npy")
        assert backend.exists("a/j.json")


def _two_files(backend: SharedMemoryBackend) -> tuple[Any, Any]:
    return _file_and_metadata(backend, "d/f.npy"), _file_and_metadata(backend, "e/g.npy")


@pytest.mark.timeout(120)
def test_a_kill_leaves_a_moved_file_at_one_place_with_its_metadata() -> None:
    with SharedMemoryBackend() as backend:
        steps = 0
        for at in [-1, *range(1, 10_000)]:
            if at > steps > 0:
                break
            for directory in ("d", "e"):
                if backend.exists(directory):
                    backend.delete(directory, recursive=True)
            _save(1, True)(backend)
            backend.save(np.full(10, 0), "e/g.npy", metadata={"v": 0})
            counted = _killed_at(at, lambda: backend.move("d/f.npy", "e/g.npy"))
            got = _two_files(backend)
            if at == -1:
                steps = counted
                assert steps > 3 and got == ((None, None), (1, 1))
                continue
            assert got in [((1, 1), (0, 0)), ((None, None), (1, 1))], f"step {at}: {got}"


@pytest.mark.timeout(120)
def test_a_kill_while_clearing_files_leaves_no_metadata_without_its_file() -> None:
    from polystore.exceptions import MetadataNotFoundError

    with SharedMemoryBackend() as backend:
        steps = 0
        for at in [-1, *range(1, 10_000)]:
            if at > steps > 0:
                break
            backend.clear_files_only()
            for i in range(3):
                backend.save(np.full(8, i), f"d/{i}.npy", metadata={"v": i})
            counted = _killed_at(at, backend.clear_files_only)
            if at == -1:
                steps = counted
            for i in range(3):
                try:
                    meta = backend.load_metadata(f"d/{i}.npy")
                except MetadataNotFoundError:
                    meta = None
                present = backend.exists(f"d/{i}.npy")
                assert meta == ({"v": i} if present else None), f"step {at} of {steps}: file {i}"
            assert backend.is_dir("d")


def _orphans(backend: SharedMemoryBackend) -> list[str]:
    """Files and directories whose parent directory is missing from the tree."""
    keys = [k for k in backend._shm if not k.startswith("#")]
    found = []
    for key in keys:
        parent = key.rstrip("/").rsplit("/", 1)[0]
        if parent and parent + "/" not in keys:
            found.append(key)
    return found


def test_a_file_is_never_left_outside_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """What another process does between the checks and the write cannot orphan a file.

    The directories above a file are made, and a file in their place
    refused, in the same step as the file is written.
    """
    with SharedMemoryBackend() as backend:
        store = backend._shm
        real = SharedMemoryBackend._check_parents

        def meanwhile(action: Any) -> None:
            def check(self: Any, vpath: str, create: bool) -> list[str]:
                found = real(self, vpath, create)
                action()
                return found

            monkeypatch.setattr(SharedMemoryBackend, "_check_parents", check)

        backend.ensure_directory("d/e")
        meanwhile(lambda: store.update(remove=["/d/e/", "/d/"]))  # rm -r of the empty tree
        backend.save(np.zeros(3), "d/e/f.npy", metadata={"v": 1})
        assert backend.list_dir("d/e") == ["f.npy"] and not _orphans(backend)
        monkeypatch.undo()
        backend.delete("d", recursive=True)
        backend.ensure_directory("d")
        backend.save(np.ones(2), "s.npy")
        meanwhile(lambda: store.update({"/d/x": b"Sfile"}))  # a file where a directory goes
        with pytest.raises(NotADirectoryError):
            backend.save(np.zeros(3), "d/x/f.npy")
        assert not backend.exists("d/x/f.npy") and not _orphans(backend)
        with pytest.raises(NotADirectoryError), backend.create_array("d/x/g.npy", 4, "i8") as out:
            out[:] = 1
        with pytest.raises(NotADirectoryError):
            backend.move("s.npy", "d/x/h.npy")
        assert backend.exists("s.npy")
        assert not _orphans(backend)
        monkeypatch.undo()
        backend.save(np.ones(2), "a/b.npy")
        meanwhile(lambda: store.update(remove=["/c/"]))
        backend.ensure_directory("c")
        backend.move("a/b.npy", "c/b.npy")
        assert backend.list_dir("c") == ["b.npy"] and not _orphans(backend)


def _remover(name: str, seconds: float) -> None:  # pragma: no cover - child
    backend = SharedMemoryBackend(name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            backend.delete("d", recursive=True)
        except FileNotFoundError:
            pass
    backend.close()


@pytest.mark.timeout(60)
def test_files_saved_while_another_process_removes_their_directory() -> None:
    with SharedMemoryBackend() as backend:
        child = multiprocessing.get_context("fork").Process(
            target=_remover, args=(backend._shm.name, 1.0)
        )
        child.start()
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline:
            backend.save(np.full(4, i), f"d/e/{i % 7}.npy", metadata={"i": i})
            with backend.create_array(f"d/{i % 5}.npy", 4, np.int64) as out:
                out[:] = i
            i += 1
        child.join(30)
        assert child.exitcode == 0 and i > 10
        assert not _orphans(backend), _orphans(backend)


def test_a_directory_removed_while_a_file_appears_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its marker goes only in a step that finds nothing under it (ENOTEMPTY otherwise)."""
    with SharedMemoryBackend() as backend:
        store = backend._shm
        backend.save(np.zeros(2), "d/a.npy")
        real = SharedMemoryBackend._remove_file
        late = iter(["/d/late.npy", "/d/later.npy"])

        def remove_file(self: Any, vpath: str) -> None:
            real(self, vpath)
            name = next(late, None)
            if name is not None:  # another process saves a file there meanwhile
                store.update({name: np.ones(2), "/d/": b""})

        monkeypatch.setattr(SharedMemoryBackend, "_remove_file", remove_file)
        backend.delete("d", recursive=True)  # lists again until nothing is left
        assert not backend.exists("d") and not _orphans(backend)
        monkeypatch.undo()
        backend.ensure_directory("e")
        real_kind = SharedMemoryBackend._kind_of

        def kind_of(self: Any, vpath: str) -> Any:
            found = real_kind(self, vpath)
            if vpath == "/e":
                store.update({"/e/f.npy": np.ones(2)})  # after the listing found it empty
            return found

        monkeypatch.setattr(SharedMemoryBackend, "_kind_of", kind_of)
        with pytest.raises(OSError, match="not empty"):
            backend.delete("e")
        monkeypatch.undo()
        assert backend.list_dir("e") == ["f.npy"] and not _orphans(backend)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["save", "create_array"])
def test_a_kill_leaves_a_new_file_with_its_directories_or_neither(how: str) -> None:
    def write(backend: SharedMemoryBackend) -> None:
        if how == "save":
            backend.save(np.full(1000, 2), "n/m/f.npy", metadata={"v": 2})
        else:
            with backend.create_array("n/m/f.npy", 1000, np.int64, metadata={"v": 2}) as out:
                out[:] = 2

    with SharedMemoryBackend() as backend:
        write(backend)  # (blocks of these sizes ready: no segment to create at every try)
        steps = 0
        for at in [-1, *range(1, 10_000)]:
            if at > steps > 0:
                break
            if backend.exists("n"):
                backend.delete("n", recursive=True)
            counted = _killed_at(at, lambda: write(backend))
            if at == -1:
                steps = counted
                assert 3 < steps < 500, steps
            assert not _orphans(backend), f"step {at} of {steps}: {_orphans(backend)}"
            if backend.exists("n/m/f.npy"):
                assert backend.list_dir("n/m") == ["f.npy"]
                assert backend.load_metadata("n/m/f.npy") == {"v": 2}
            else:
                assert not backend.exists("n"), f"step {at} of {steps}: directories alone"
