"""The disk backend: the conformance suite plus what only a real file system shows."""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from polystore.base import StorageBackend
from polystore.disk import DiskBackend
from polystore.exceptions import (
    MetadataNotFoundError,
    ReservedNameError,
    SandboxError,
    StorageError,
    UnsupportedFormatError,
)
from polystore.formats import Format, default_formats
from polystore.locks import STALE_AFTER, TEMP_PREFIX
from polystore.testing import BackendTests, assert_same_value


class TestDiskBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> DiskBackend:
        return DiskBackend(root=tmp_path)

    # The raw helpers read and write files with numpy and the standard library.
    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        assert isinstance(backend, DiskBackend) and backend.root is not None
        file = Path(backend.root, path)
        if not file.is_file():
            raise FileNotFoundError(path)
        suffix = file.suffix
        if suffix == ".npy":
            return np.load(file, allow_pickle=False)
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".json":
            return json.loads(file.read_bytes().decode("utf-8"))
        if suffix == ".txt":
            return file.read_bytes().decode("utf-8")
        return file.read_bytes()

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:
        assert isinstance(backend, DiskBackend) and backend.root is not None
        file = Path(backend.root, path)
        file.parent.mkdir(parents=True, exist_ok=True)
        if file.suffix == ".npy":
            np.save(file, value, allow_pickle=False)
        elif file.suffix == ".npz":
            np.savez(file, **value)
        elif file.suffix == ".json":
            file.write_text(json.dumps(value), encoding="utf-8")
        elif file.suffix == ".txt":
            file.write_bytes(value.encode("utf-8"))
        else:
            file.write_bytes(value)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def disk(root: Path) -> DiskBackend:
    return DiskBackend(root=root)


def raw_names(directory: Path) -> list[str]:
    """Everything really in a directory, hidden files included (bypasses the backend)."""
    return sorted(os.listdir(directory))


# -- sandbox --------------------------------------------------------------------


@pytest.mark.parametrize("escape", ["../outside.npy", "a/../../outside.npy", "/etc/outside.npy"])
def test_paths_leaving_the_root_are_refused(disk: DiskBackend, root: Path, escape: str) -> None:
    for call in (
        lambda: disk.save(np.ones(1), escape),
        lambda: disk.load(escape),
        lambda: disk.exists(escape),
        lambda: disk.delete(escape),
        lambda: disk.list_files(escape),
        lambda: disk.copy("inside.npy", escape),
    ):
        with pytest.raises(SandboxError) as info:
            call()
        assert isinstance(info.value, PermissionError)
        assert isinstance(info.value, StorageError)
    assert not (root.parent / "outside.npy").exists()


def test_paths_inside_the_root_are_accepted(disk: DiskBackend, root: Path) -> None:
    disk.save(np.arange(3), "a/../b.npy")
    assert (root / "b.npy").is_file()
    assert_same_value(disk.load(str(root / "b.npy")), np.arange(3))
    assert disk.is_dir(".") and disk.is_dir(str(root))
    assert disk.resolve("b.npy") == str(root / "b.npy")


def test_symlinks_out_of_the_root_are_refused(
    disk: DiskBackend, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "secret.npy", np.ones(2))
    (root / "door").symlink_to(outside, target_is_directory=True)
    (root / "peek.npy").symlink_to(outside / "secret.npy")
    for path in ("door/secret.npy", "peek.npy"):
        with pytest.raises(SandboxError):
            disk.load(path)
    with pytest.raises(SandboxError):
        disk.save(np.zeros(2), "door/new.npy")
    assert not (outside / "new.npy").exists()
    # Links leading out are not part of the tree the backend shows.
    assert disk.list_dir(".") == []
    assert disk.list_files(".", recursive=True) == []


def test_symlinks_inside_the_root_work(disk: DiskBackend, root: Path) -> None:
    disk.save(np.arange(2), "real/a.npy")
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert_same_value(disk.load("alias/a.npy"), np.arange(2))
    assert disk.list_files("alias") == ["alias/a.npy"]


def test_root_itself_cannot_be_deleted(disk: DiskBackend) -> None:
    with pytest.raises(SandboxError):
        disk.delete(".", recursive=True)


def test_without_root_paths_are_taken_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    disk = DiskBackend()
    disk.save({"k": 1}, "rel/v.json")
    assert (tmp_path / "rel" / "v.json").is_file()
    disk.save(np.ones(1), str(tmp_path / "abs.npy"))
    assert disk.list_files("rel") == ["rel/v.json"]
    assert disk.load("../" + tmp_path.name + "/rel/v.json") == {"k": 1}


# -- reserved names and leftovers ---------------------------------------------------


def test_own_files_never_listed(disk: DiskBackend, root: Path) -> None:
    disk.save(np.ones(1), "d/a.npy", metadata={"k": 1})
    with disk.lock("d/a.npy"):
        assert any(n.startswith(".polystore-lock-") for n in raw_names(root / "d"))
        assert disk.list_dir("d") == ["a.npy"]
    assert ".polystore-meta-a.npy.json" in raw_names(root / "d")
    assert disk.list_dir("d") == ["a.npy"]
    assert disk.list_files("d", recursive=True) == ["d/a.npy"]
    assert disk.list_files(".", recursive=True) == ["./d/a.npy"]


@pytest.mark.parametrize(
    "name", [".polystore-x.npy", ".polystore-meta-a.npy.json", ".polystore-d/a.npy"]
)
def test_reserved_names_are_refused(disk: DiskBackend, name: str) -> None:
    with pytest.raises(ReservedNameError, match="reserved"):
        disk.save(np.ones(1), name)
    with pytest.raises(ReservedNameError):
        disk.exists(name)
    assert isinstance(ReservedNameError(name, ".polystore-"), ValueError)


def dead_pid() -> int:
    """A pid that no process has (a finished child's)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_hidden_then_cleaned(disk: DiskBackend, root: Path) -> None:
    disk.save(np.ones(1), "d/a.npy")
    dead = root / "d" / f"{TEMP_PREFIX}{dead_pid()}-0123abcd"
    live = root / "d" / f"{TEMP_PREFIX}{os.getpid()}-0123abcd"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    assert disk.list_dir("d") == ["a.npy"]
    assert disk.cleanup("d", max_age=3600) == []  # too recent: kept
    old = os.stat(dead).st_mtime - STALE_AFTER - 1
    for path in (dead, live):
        os.utime(path, (old, old))
    disk.ensure_directory("d")  # cleans a directory that already exists
    assert raw_names(root / "d") == sorted(["a.npy", live.name])


def test_cleanup_removes_unheld_locks_and_orphan_metadata(disk: DiskBackend, root: Path) -> None:
    disk.save(np.ones(1), "d/a.npy", metadata={"k": 1})
    (root / "d" / ".polystore-lock-a.npy").touch()  # left by a killed holder
    (root / "d" / ".polystore-lock").touch()  # a commit lock's, likewise
    os.unlink(root / "d" / "a.npy")  # metadata now describes nothing
    removed = disk.cleanup(".", max_age=0)
    assert removed == [
        "./d/.polystore-lock",
        "./d/.polystore-lock-a.npy",
        "./d/.polystore-meta-a.npy.json",
    ]
    assert raw_names(root / "d") == []


def test_only_what_was_saved_is_left(disk: DiskBackend, root: Path) -> None:
    # No lock or metadata file outlives its use: a user listing the directory
    # with os.listdir sees the files they wrote and nothing else.
    disk.save(np.ones(1), "d/a.npy")
    disk.save({"k": 1}, "d/b.json", overwrite=False)
    disk.copy("d/a.npy", "d/c.npy")
    disk.copy("d/b.json", "d/c.json")
    disk.move("d/c.npy", "e/c.npy")
    assert raw_names(root / "d") == ["a.npy", "b.json", "c.json"]
    assert raw_names(root / "e") == ["c.npy"]
    disk.save(np.ones(1), "d/a.npy", metadata={"k": 1})
    assert raw_names(root / "d") == [".polystore-meta-a.npy.json", "a.npy", "b.json", "c.json"]
    disk.save(np.ones(1), "d/a.npy")
    assert raw_names(root / "d") == ["a.npy", "b.json", "c.json"]
    for name in ("a.npy", "b.json", "c.json"):
        disk.delete("d/" + name)
    assert raw_names(root / "d") == []
    with disk.lock("e/c.npy"):
        assert len(raw_names(root / "e")) == 2
    assert raw_names(root / "e") == ["c.npy"]


def test_directory_with_only_own_files_deletes(disk: DiskBackend, root: Path) -> None:
    disk.save(np.ones(1), "d/a.npy", metadata={"k": 1})
    (root / "d" / f"{TEMP_PREFIX}1-dead").write_bytes(b"")
    disk.delete("d/a.npy")
    assert disk.list_dir("d") == []
    disk.delete("d")
    assert not (root / "d").exists()


# -- errors are not swallowed ---------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_error_is_not_missing(disk: DiskBackend, root: Path) -> None:
    disk.save(np.ones(1), "locked/a.npy")
    (root / "locked").chmod(0)
    try:
        with pytest.raises(PermissionError):
            disk.exists("locked/a.npy")
        with pytest.raises(PermissionError):
            disk.load("locked/a.npy")
    finally:
        (root / "locked").chmod(stat.S_IRWXU)


def test_stat_errors_other_than_missing_propagate(
    disk: DiskBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs as root too, where chmod cannot provoke the error.
    def denied(*args: Any, **kwargs: Any) -> os.stat_result:
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(os, "stat", denied)
    for query in (disk.exists, disk.is_file, disk.is_dir):
        with pytest.raises(PermissionError):
            query("a.npy")


def test_failed_write_leaves_nothing(disk: DiskBackend, root: Path) -> None:
    class Exploding(Format):
        name = "boom"
        extensions = (".boom",)

        def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
            return data

        def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
            stream.write(b"partial")
            raise RuntimeError("disk on fire")

    formats = default_formats()
    formats.register(Exploding())
    backend = DiskBackend(root=root, formats=formats)
    backend.save(np.ones(1), "d/keep.npy")
    with pytest.raises(RuntimeError, match="fire"):
        backend.save(1, "d/x.boom")
    assert raw_names(root / "d") == ["keep.npy"]


# -- formats ----------------------------------------------------------------------


def test_object_arrays_are_refused_without_allow_pickle(disk: DiskBackend, root: Path) -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        disk.save(objects, "o.npy")
    assert raw_names(root) == []
    disk.save(objects, "o.npy", allow_pickle=True)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        disk.load("o.npy")
    assert disk.load("o.npy", allow_pickle=True)[0] == {"a": 1}
    # A file written by someone else is refused just the same.
    np.save(root / "foreign.npy", objects, allow_pickle=True)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        disk.load("foreign.npy")


def test_npy_files_are_plain_numpy(disk: DiskBackend, root: Path) -> None:
    data = np.arange(12, dtype=np.int32).reshape(3, 4)
    disk.save(data, "a.npy")
    assert_same_value(np.load(root / "a.npy"), data)
    mapped = disk.load("a.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    assert_same_value(np.asarray(mapped), data)
    with pytest.raises(UnsupportedFormatError):
        disk.load("a.json", mmap_mode="r")


def test_tiff_round_trip(disk: DiskBackend) -> None:
    pytest.importorskip("tifffile")
    image = np.arange(64, dtype=np.uint16).reshape(8, 8)
    disk.save(image, "img/a.tif")
    assert_same_value(disk.load("img/a.tif"), image)


def test_fsync_and_options(root: Path) -> None:
    backend = DiskBackend(root=root, fsync=True, lock_timeout=None)
    backend.save(np.ones(3), "a.npy", metadata={"k": 1})
    backend.save(np.zeros(3), "a.npy", fsync=False)
    assert_same_value(backend.load("a.npy"), np.zeros(3))
    with pytest.raises(ValueError):
        DiskBackend(root=root, lock_timeout=-1)


# -- copy, move, metadata ------------------------------------------------------------


def test_copy_keeps_bytes_mode_and_time(disk: DiskBackend, root: Path) -> None:
    disk.save(np.arange(5), "a.npy", metadata={"k": 1})
    os.chmod(root / "a.npy", 0o640)
    os.utime(root / "a.npy", (1_000_000, 1_000_000))
    disk.copy("a.npy", "b/c.npy")
    assert (root / "b" / "c.npy").read_bytes() == (root / "a.npy").read_bytes()
    assert stat.S_IMODE(os.stat(root / "b" / "c.npy").st_mode) == 0o640
    assert os.stat(root / "b" / "c.npy").st_mtime == 1_000_000
    assert disk.load_metadata("b/c.npy") == {"k": 1}


def test_move_renames_and_carries_metadata(disk: DiskBackend, root: Path) -> None:
    disk.save(np.arange(5), "a.npy", metadata={"k": 1})
    inode = os.stat(root / "a.npy").st_ino
    disk.save(np.ones(1), "b.npy", metadata={"old": True})
    disk.move("a.npy", "b.npy")
    assert os.stat(root / "b.npy").st_ino == inode
    assert disk.load_metadata("b.npy") == {"k": 1}
    assert raw_names(root) == [".polystore-meta-b.npy.json", "b.npy"]
    with pytest.raises(FileExistsError):
        disk.save(np.ones(1), "c.npy") or disk.move("c.npy", "b.npy", overwrite=False)
    disk.move("b.npy", "sub/d.npy", overwrite=False)
    assert disk.load_metadata("sub/d.npy") == {"k": 1}
    with pytest.raises(MetadataNotFoundError):
        disk.load_metadata("b.npy")


def test_copy_between_formats_converts(disk: DiskBackend) -> None:
    disk.save({"a": 1}, "v.json")
    with pytest.raises(UnsupportedFormatError):
        disk.copy("v.json", "v.txt")
    disk.save(b"raw", "v.bin")
    disk.move("v.bin", "v.raw")
    assert disk.load("v.raw") == b"raw"


def test_metadata_of_long_names(disk: DiskBackend) -> None:
    name = "n" * 240 + ".npy"
    disk.save(np.ones(1), name, metadata={"long": True})
    assert disk.load_metadata(name) == {"long": True}
    assert disk.list_dir(".") == [name]


# -- concurrency within one process ---------------------------------------------------


def test_overwrite_false_has_one_winner_among_threads(disk: DiskBackend) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        try:
            disk.save(np.full(1000, i), "race.npy", overwrite=False, metadata={"i": i})
            outcomes.append(f"won {i}")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and len(outcomes) == 8
    i = int(winners[0].split()[1])
    assert_same_value(disk.load("race.npy"), np.full(1000, i))
    assert disk.load_metadata("race.npy") == {"i": i}


def test_pickles_by_configuration(root: Path) -> None:
    backend = DiskBackend(root=root, fsync=True, lock_timeout=3)
    clone = pickle.loads(pickle.dumps(backend))
    assert (clone.root, clone.fsync, clone.lock_timeout) == (str(root), True, 3.0)
    backend.save(np.ones(2), "a.npy")
    assert_same_value(clone.load("a.npy"), np.ones(2))


def test_import_does_not_load_portalocker(run_python: Any) -> None:
    proc = run_python(
        """
        import sys
        import polystore.disk, polystore.locks
        print("portalocker" in sys.modules)
        """
    )
    assert proc.stdout.strip() == "False"


def test_spec_example_through_file_manager(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polystore import FileManager

    monkeypatch.chdir(root)
    fm = FileManager({"disk": DiskBackend()})
    data = np.array([1, 2, 3])
    fm.save(data, "output.npy", backend="disk", metadata={"key": "value"})
    assert_same_value(fm.load("output.npy", backend="disk"), data)
    assert fm.load_metadata("output.npy", backend="disk") == {"key": "value"}
    assert fm.list_files(".", backend="disk") == ["./output.npy"]
