"""The shm backends' files under crashes and concurrent writers.

A file, its metadata and the directories above it change in one step of the
store, as a file and its sidecar do on disk: a writer killed at any step of
``save``, ``create_array``, ``delete``, ``move`` or ``clear_files_only``
leaves the old state or the new one, and another process removing a
directory or saving a file in its place meanwhile never leaves a file
outside the tree. The store's own crash tests (``test_shm_crash.py``) run
each step in Python and in C; these run with the default path.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import numpy as np
import pytest

from polystore import SharedMemoryBackend
from polystore.exceptions import MetadataNotFoundError


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
