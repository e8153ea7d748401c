"""The zarr backend: the conformance suite plus what is specific to zarr.

Region writes and their locks are tested in ``test_zarr_regions.py``.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import BackendRegistry, FileManager
from polystore._zarr_tree import _HOST
from polystore.base import StorageBackend
from polystore.exceptions import (
    LockRequiredError,
    MetadataNotFoundError,
    ReservedNameError,
    SandboxError,
    UnsupportedFormatError,
)
from polystore.testing import BackendTests
from polystore.zarr_backend import ZarrBackend

zarr = pytest.importorskip("zarr", minversion="3")


class TestZarrBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ZarrBackend]:
        self.root = str(tmp_path)
        with ZarrBackend(tmp_path) as backend:
            yield backend

    # The raw helpers open the hierarchy with zarr itself.
    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        try:
            return zarr.open_array(store=self.root, path=path, mode="r")[...]
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise FileNotFoundError(path) from None

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:
        zarr.open_group(self.root, mode="a").create_array(path, data=value)


@pytest.fixture
def backend(tmp_path: Path) -> ZarrBackend:
    return ZarrBackend(tmp_path)


@pytest.fixture
def memory_root() -> Iterator[str]:
    fsspec = pytest.importorskip("fsspec")
    root = f"memory://polystore-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# -- the layout, as zarr itself sees it ------------------------------------------


def test_filemanager_plate_layout(tmp_path: Path) -> None:
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    for well in ("A/1.npy", "A/2.npy", "B/1.npy"):
        fm.save(np.ones((2, 2)), f"plate.zarr/{well}", backend="zarr")
    assert fm.list_files("plate.zarr", backend="zarr", recursive=True) == [
        "plate.zarr/A/1.npy",
        "plate.zarr/A/2.npy",
        "plate.zarr/B/1.npy",
    ]
    assert fm.is_dir("plate.zarr/A", backend="zarr")
    assert fm.is_file("plate.zarr/A/1.npy", backend="zarr")
    # a plain zarr reader sees groups and arrays
    plate = zarr.open_group(tmp_path / "plate.zarr", mode="r")
    assert sorted(plate.group_keys()) == ["A", "B"]
    assert sorted(plate["A"].array_keys()) == ["1.npy", "2.npy"]


def test_default_registry_keeps_each_store_in_its_zarr_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fm = FileManager(BackendRegistry())
    fm.save(np.arange(4), "out/plate.zarr/A/1.npy", backend="zarr")
    assert fm.list_files("out/plate.zarr", backend="zarr", recursive=True) == [
        "out/plate.zarr/A/1.npy"
    ]
    assert fm.is_dir("out/plate.zarr", backend="zarr")
    assert fm.is_dir(str(tmp_path / "out/plate.zarr/A"), backend="zarr")
    # the store is the .zarr directory: nothing is written above it
    assert sorted(os.listdir(tmp_path / "out")) == ["plate.zarr"]
    assert zarr.open_array(tmp_path / "out/plate.zarr", path="A/1.npy", mode="r")[1] == 1
    with pytest.raises(ValueError, match=r"\*\.zarr"):
        fm.exists("out", backend="zarr")
    fm.delete("out/plate.zarr", backend="zarr", recursive=True)
    assert not (tmp_path / "out/plate.zarr").exists()


def test_creation_options_reach_zarr(backend: ZarrBackend) -> None:
    codec = zarr.codecs.ZstdCodec(level=5)
    backend.save(np.zeros((40, 30)), "a", chunks=(16, 10), compressors=[codec], fill_value=0)
    lazy = backend.load("a", lazy=True)
    assert isinstance(lazy, zarr.Array)
    assert lazy.chunks == (16, 10)
    assert lazy.compressors == (codec,)


def test_lazy_load_reads_slices(backend: ZarrBackend) -> None:
    data = np.arange(100).reshape(10, 10)
    backend.save(data, "lazy.npy", chunks=(5, 5))
    lazy = backend.load("lazy.npy", lazy=True)
    np.testing.assert_array_equal(lazy[2:4, 7:], data[2:4, 7:])
    with pytest.raises(ValueError, match="read-only"):
        lazy[0, 0] = 1


def test_metadata_is_the_arrays_attributes(backend: ZarrBackend, tmp_path: Path) -> None:
    backend.save(np.ones(3), "g/a.npy", metadata={"channel": "DAPI", "z": (0, 1)})
    assert zarr.open_array(tmp_path, path="g/a.npy", mode="r").attrs.asdict() == {
        "channel": "DAPI",
        "z": [0, 1],
    }
    with pytest.raises(MetadataNotFoundError):
        backend.load_metadata("g")
    backend.save(np.ones(3), "g/b.npy", metadata={1: "int keys become strings, as in JSON"})
    assert backend.load_metadata("g/b.npy") == {"1": "int keys become strings, as in JSON"}


@pytest.mark.parametrize(
    "value",
    [{"a": np.ones(2)}, "text", b"bytes", None, np.array([object(), 1], dtype=object)],
    ids=["dict", "str", "bytes", "none", "objects"],
)
def test_refuses_what_is_not_an_array(backend: ZarrBackend, value: Any) -> None:
    with pytest.raises(UnsupportedFormatError):
        backend.save(value, "v.npy")
    assert backend.list_dir(".") == []


def test_unknown_keywords_are_errors(backend: ZarrBackend) -> None:
    with pytest.raises(TypeError, match="compresor"):
        backend.save(np.ones(2), "a", compresor="zstd")
    backend.save(np.ones(2), "a")
    with pytest.raises(TypeError, match="mmap_mode"):
        backend.load("a", mmap_mode="r")


# -- paths -----------------------------------------------------------------------------


def test_paths_stay_inside_the_root(backend: ZarrBackend, tmp_path: Path) -> None:
    backend.save(np.ones(1), str(tmp_path / "inside" / "a"))
    assert backend.is_file("inside/a")
    for escape in ("../outside", "a/../../outside", "/elsewhere/a", str(tmp_path.parent / "x")):
        with pytest.raises(SandboxError):
            backend.save(np.ones(1), escape)
    assert not (tmp_path.parent / "outside").exists()


@pytest.mark.parametrize("name", ["g/zarr.json", "g/.zattrs", ".zgroup"])
def test_metadata_document_names_are_refused(backend: ZarrBackend, name: str) -> None:
    with pytest.raises(ValueError, match="metadata document"):
        backend.save(np.ones(1), name)


def test_private_directory_is_reserved(backend: ZarrBackend) -> None:
    with pytest.raises(ReservedNameError):
        backend.save(np.ones(1), ".polystore-zarr/tmp/x")


def test_private_directory_stays_out_of_listings(backend: ZarrBackend, tmp_path: Path) -> None:
    backend.save(np.ones(4), "a")
    backend.save(np.zeros(4), "a")  # goes through .polystore-zarr/tmp
    backend.save(np.ones(3), "r", region=(slice(1, 4),), shape=(10,), chunks=(4,))  # locks
    assert (tmp_path / ".polystore-zarr").is_dir()
    assert backend.list_dir(".") == ["a", "r"]
    assert backend.list_files(".", recursive=True) == ["./a", "./r"]
    assert os.listdir(tmp_path / ".polystore-zarr" / "tmp") == []


def test_the_root_cannot_be_deleted(backend: ZarrBackend) -> None:
    backend.save(np.ones(1), "a")
    with pytest.raises(OSError) as info:
        backend.delete(".", recursive=True)
    assert info.value.errno == errno.EBUSY
    assert backend.is_file("a")


def test_leftovers_of_dead_writers_are_removed(backend: ZarrBackend, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=int)
    dead.start()
    dead.join()
    backend.save(np.ones(1), "first")
    tmp = tmp_path / ".polystore-zarr" / "tmp"
    assert os.listdir(tmp) == []  # nothing left after a clean save
    orphan = tmp / f"{_HOST}-{dead.pid}-{uuid.uuid4().hex}"
    (orphan / "c").mkdir(parents=True)
    ZarrBackend(tmp_path).save(np.ones(1), "second")  # a new process's first save cleans up
    assert not orphan.exists()


# -- pickling, other stores, other formats ----------------------------------------------


def test_pickles_as_configuration(tmp_path: Path) -> None:
    backend = ZarrBackend(tmp_path, lock_timeout=5, lock_dir=tmp_path / "locks")
    backend.save(np.arange(3), "a")
    clone = pickle.loads(pickle.dumps(backend))
    assert clone.root == str(tmp_path)
    np.testing.assert_array_equal(clone.load("a"), np.arange(3))


def test_memory_url_store(memory_root: str) -> None:
    backend = ZarrBackend(memory_root)
    backend.save(np.arange(6), "g/a.npy", metadata={"k": 1})
    backend.save(np.arange(6) * 2, "g/a.npy")
    assert backend.list_files("g") == ["g/a.npy"]
    np.testing.assert_array_equal(backend.load("g/a.npy"), np.arange(6) * 2)
    with pytest.raises(MetadataNotFoundError):
        backend.load_metadata("g/a.npy")
    backend.delete("g", recursive=True)
    assert not backend.exists("g")


def test_memory_url_refuses_unaligned_regions_without_a_lock_dir(
    memory_root: str, tmp_path: Path
) -> None:
    backend = ZarrBackend(memory_root)
    backend.save(np.ones(4), "r", region=(slice(0, 4),), shape=(12,), chunks=(4,))
    with pytest.raises(LockRequiredError, match="lock_dir"):
        backend.save(np.ones(3), "r", region=(slice(5, 8),))
    np.testing.assert_array_equal(backend.load("r"), [1] * 4 + [0] * 8)
    locked = ZarrBackend(memory_root, lock_dir=tmp_path)
    locked.save(np.ones(3), "r", region=(slice(5, 8),))
    np.testing.assert_array_equal(locked.load("r"), [1] * 4 + [0, 1, 1, 1] + [0] * 4)


def test_zarr_format_2(tmp_path: Path) -> None:
    backend = ZarrBackend(tmp_path, zarr_format=2)
    backend.save(np.arange(5), "g/a", metadata={"v": 2})
    backend.save(np.ones((2, 4)), "g/r", region=(slice(1, 3),), shape=(4, 4), chunks=(2, 2))
    assert backend.list_files("g") == ["g/a", "g/r"]
    assert backend.load_metadata("g/a") == {"v": 2}
    assert (tmp_path / "g" / "a" / ".zarray").exists()
    assert backend.load("g/r").sum() == 8


# -- replacing an array while others read it ---------------------------------------------


def _flip(root: str, count: int) -> None:
    backend = ZarrBackend(root)
    for i in range(count):
        if i % 2:
            backend.save(np.full((64, 64), 1.0), "flip", chunks=(32, 32))
        else:
            backend.save(np.full(32, 2.0), "flip", chunks=(16,))


@pytest.mark.timeout(60)
def test_readers_see_old_or_new_array_never_a_mix(tmp_path: Path) -> None:
    backend = ZarrBackend(tmp_path)
    backend.save(np.full(32, 2.0), "flip")
    writer = multiprocessing.get_context("spawn").Process(target=_flip, args=(str(tmp_path), 80))
    writer.start()
    try:
        reads = 0
        while writer.is_alive() or reads < 20:
            value = backend.load("flip")
            assert value.shape in ((32,), (64, 64))
            assert np.all(value == (2.0 if value.shape == (32,) else 1.0))
            reads += 1
    finally:
        writer.join(30)
    assert writer.exitcode == 0
    assert os.listdir(tmp_path / ".polystore-zarr" / "tmp") == []


def test_a_read_that_never_sees_the_array_stand_still_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polystore import _zarr_tree, zarr_backend

    backend = ZarrBackend(tmp_path)
    backend.save(np.full(32, 2.0), "flip")
    monkeypatch.setattr(zarr_backend, "_READ_PATIENCE", 0.05)
    # as if a writer replaced the array during every read
    monkeypatch.setattr(_zarr_tree.Hierarchy, "version", lambda self, key: object())
    with pytest.raises(BlockingIOError, match="replaced") as info:
        backend.load("flip")
    assert info.value.errno == errno.EAGAIN
    monkeypatch.undo()
    assert np.array_equal(backend.load("flip"), np.full(32, 2.0))


# -- without the extra -------------------------------------------------------------------


def test_missing_zarr_names_the_extra(run_python: Any, tmp_path: Path) -> None:
    proc = run_python(
        f"""
        import sys
        sys.modules["zarr"] = None  # import zarr now fails, as when it is not installed
        import numpy as np
        from polystore import BackendRegistry, FileManager, StorageError, ZarrBackend
        backend = ZarrBackend({str(tmp_path)!r})  # building one needs no zarr
        for call in (lambda: backend.save(np.ones(2), "a"), lambda: backend.exists("a"),
                     lambda: FileManager(BackendRegistry()).load("p.zarr/a", backend="zarr")):
            try:
                call()
            except ImportError as exc:
                assert isinstance(exc, StorageError), type(exc)
                assert "pip install 'polystore[zarr]'" in str(exc), str(exc)
            else:
                raise AssertionError("no error without zarr")
        print("ok")
        """
    )
    assert proc.stdout.strip() == "ok"
    assert os.listdir(tmp_path) == []
