"""What a user of the original polystore relies on, kept working (issue 15)."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import polystore
from polystore import (
    BackendNotFoundError,
    BackendRegistry,
    DiskBackend,
    FileManager,
    MemoryBackend,
    SharedMemoryBackend,
    UnsupportedFormatError,
)


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


# -- 4: backend names in any case; FileManager(None) -------------------------------
@pytest.mark.parametrize("name", ["MEMORY", "Memory", "memory"])
def test_backend_names_ignore_case(name: str) -> None:
    fm = FileManager({"memory": MemoryBackend()})
    fm.save(np.arange(3), "a.npy", name)
    assert fm.get_backend(name) is fm.get_backend("memory")
    np.testing.assert_array_equal(fm.load("a.npy", "memory"), np.arange(3))


def test_exact_name_wins_and_ambiguous_case_is_refused() -> None:
    lower, upper, other = MemoryBackend(), MemoryBackend(), MemoryBackend()
    fm = FileManager({"mem": lower, "MEM": upper, "Other": other})
    assert fm.get_backend("MEM") is upper and fm.get_backend("mem") is lower
    assert fm.get_backend("other") is other
    with pytest.raises(BackendNotFoundError, match="Mem"):
        fm.get_backend("Mem")  # two names match without case: neither is guessed


def test_unknown_name_still_lists_the_choices(fm: FileManager) -> None:
    with pytest.raises(BackendNotFoundError, match="'disk'"):
        fm.get_backend("DSIK")


def test_filemanager_without_registry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="registry"):
        FileManager(None)  # type: ignore[arg-type]


# -- 3: natural order on request -------------------------------------------------
NAMES = ["img10.npy", "img2.npy", "img1.npy", "img02.npy", "IMG3.npy"]


def _populate(fm: FileManager) -> None:
    for name in NAMES:
        fm.save(np.zeros(1), f"plate/{name}", "memory")
        fm.ensure_directory(f"plate/well{name[3:-4]}", "memory")


def test_listings_sort_by_code_point_by_default() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    _populate(fm)
    assert fm.list_files("plate", "memory") == sorted(f"plate/{n}" for n in NAMES)
    assert fm.list_dir("plate", "memory")[:3] == ["IMG3.npy", "img02.npy", "img1.npy"]


def test_listings_sort_naturally_on_request() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    _populate(fm)
    got = fm.list_files("plate", "memory", sort="natural")
    assert got == [
        f"plate/{n}" for n in ["IMG3.npy", "img1.npy", "img02.npy", "img2.npy", "img10.npy"]
    ]
    assert fm.list_dir("plate", "memory", sort="natural")[-3:] == ["well2", "well3", "well10"]


def test_unknown_sort_order_names_the_choices() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    _populate(fm)
    with pytest.raises(ValueError, match="'natural'"):
        fm.list_files("plate", "memory", sort="size")


# -- 7: the original's keyword names, with a DeprecationWarning ----------------------
def test_copy_and_move_take_source_path_and_dest_path() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    fm.save(np.arange(2), "a.npy", "memory")
    with pytest.warns(DeprecationWarning) as rec:
        fm.copy(source_path="a.npy", dest_path="b.npy", backend="memory")
    assert sorted(str(w.message).split(": ")[1] for w in rec) == [
        "the keyword 'dest_path' is deprecated; use 'dst'",
        "the keyword 'source_path' is deprecated; use 'src'",
    ]
    assert {w.filename for w in rec} == {__file__}  # they point at the caller
    with pytest.warns(DeprecationWarning, match="'dest_path' is deprecated; use 'dst'"):
        fm.move("b.npy", dest_path="c.npy", backend="memory")
    assert fm.list_files(".", "memory") == ["./a.npy", "./c.npy"]


def test_list_dir_takes_path() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    fm.ensure_directory("d/e", "memory")
    with pytest.warns(DeprecationWarning, match="'path' is deprecated; use 'directory'"):
        assert fm.list_dir(path="d", backend="memory") == ["e"]


def test_old_and_new_name_together_is_an_error() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    with pytest.raises(TypeError, match="pass only 'src'"):
        fm.copy(source_path="a.npy", src="a.npy", dst="b.npy", backend="memory")


def test_lock_keywords_of_the_original(tmp_path: pathlib.Path) -> None:
    from polystore import atomic_update_json, file_lock

    target = tmp_path / "counter.json"
    with pytest.warns(DeprecationWarning, match="'default_data' is deprecated; use 'default'"):
        assert atomic_update_json(target, lambda n: n + 1, default_data=0) == 1
    with pytest.warns(DeprecationWarning, match="'lock_timeout' is deprecated; use 'timeout'"):
        assert atomic_update_json(target, lambda n: n + 1, lock_timeout=5) == 2
    no_effect = "'poll_interval' is deprecated and has no effect"
    with pytest.warns(DeprecationWarning, match=no_effect), file_lock(target, poll_interval=0.1):
        pass


# -- 5: the original's operations ---------------------------------------------------
@pytest.fixture(params=["memory", "disk", "shm"])
def linked(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[tuple[FileManager, str]]:
    """A FileManager and the name of a backend with links, holding a small plate."""
    backends = {
        "memory": MemoryBackend,
        "disk": lambda: DiskBackend(tmp_path),
        "shm": SharedMemoryBackend,
    }
    with backends[request.param]() as backend:
        fm = FileManager({request.param: backend})
        for path in ["p/a/img1.tif", "p/a/img10.tif", "p/a/img2.TIF", "p/b/c/x.npy", "p/y.json"]:
            value = {} if path.endswith(".json") else np.zeros((2, 2), np.uint8)
            fm.save(value, path, request.param)
        fm.ensure_directory("p/empty", request.param)
        yield fm, request.param


def test_collect_dirs_and_files(linked: tuple[FileManager, str]) -> None:
    fm, name = linked
    dirs, files = fm.collect_dirs_and_files("p", name)
    assert dirs == ["p", "p/a", "p/b", "p/b/c", "p/empty"]
    assert files == ["p/a/img1.tif", "p/a/img10.tif", "p/a/img2.TIF", "p/b/c/x.npy", "p/y.json"]
    dirs, files = fm.collect_dirs_and_files("p/", name, recursive=False, sort="natural")
    assert (dirs, files) == (["p/", "p/a", "p/b", "p/empty"], ["p/y.json"])
    with pytest.raises(FileNotFoundError):
        fm.collect_dirs_and_files("nope", name)
    with pytest.raises(NotADirectoryError):
        fm.collect_dirs_and_files("p/y.json", name)


def test_find_file_and_list_images(linked: tuple[FileManager, str]) -> None:
    fm, name = linked
    assert fm.find_file_recursive("p", "x.npy", name) == "p/b/c/x.npy"
    assert fm.find_file_recursive("p", "x", name) is None
    assert fm.list_image_files("p", name) == []
    images = fm.list_image_files("p", name, recursive=True, sort="natural")
    assert images == ["p/a/img1.tif", "p/a/img2.TIF", "p/a/img10.tif"]
    assert fm.list_image_files("p/a", name, pattern="img1*") == ["p/a/img1.tif", "p/a/img10.tif"]


def test_mirror_directory_with_symlinks(linked: tuple[FileManager, str]) -> None:
    fm, name = linked
    assert fm.mirror_directory_with_symlinks("p", "m", name) == 5
    assert fm.collect_dirs_and_files("m", name)[0] == ["m", "m/a", "m/b", "m/b/c", "m/empty"]
    assert fm.is_symlink("m/b/c/x.npy", name) and fm.stat("m/y.json", name).is_symlink
    fm.save(np.ones(3), "p/b/c/x.npy", name)
    np.testing.assert_array_equal(fm.load("m/b/c/x.npy", name), np.ones(3))
    fm.save({"not": "a link"}, "m2/y.json", name)
    with pytest.raises(FileExistsError):
        fm.mirror_directory_with_symlinks("p", "m2", name)  # a file is in the way
    assert fm.list_dir("m2", name) == ["y.json"]  # nothing was made
    with pytest.raises(FileExistsError):
        fm.mirror_directory_with_symlinks("p", "m", name)
    with pytest.warns(DeprecationWarning, match="overwrite_symlinks_only"):
        assert fm.mirror_directory_with_symlinks("p", "m", name, overwrite_symlinks_only=True) == 5
    fm.delete_all("m", name)
    assert not fm.exists("m", name) and fm.is_file("p/b/c/x.npy", name)


def test_create_symlink_with_the_original_names(linked: tuple[FileManager, str]) -> None:
    fm, name = linked
    with pytest.warns(DeprecationWarning) as rec:
        fm.create_symlink(source_path="p/y.json", symlink_path="l.json", backend=name)
    assert len(rec) == 2 and "'symlink_path' is deprecated; use 'link'" in str(rec[1].message)
    assert fm.load("l.json", name) == {}


def test_links_in_memory_lead_to_files() -> None:
    backend = MemoryBackend()
    backend.ensure_directory("d")
    with pytest.raises(IsADirectoryError):
        backend.create_symlink("d", "l")
    backend.save(np.zeros(1), "a.npy")
    backend.create_symlink("a.npy", "b.npy")
    backend.create_symlink("b.npy", "c.npy")
    with pytest.raises(OSError, match="itself"):
        backend.create_symlink("c.npy", "b.npy", overwrite=True)  # b -> c -> b


def test_disk_links_stay_in_the_root(tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros(1))
    backend = DiskBackend(tmp_path / "root")
    with pytest.raises(PermissionError):
        backend.create_symlink(outside, "l.npy")
    with pytest.raises(PermissionError):
        backend.create_symlink("x.npy", "../l.npy")
    backend.ensure_directory("d/e")
    backend.create_symlink("d", "dl")  # disk links may lead to directories
    assert backend.is_dir("dl/e") and backend.is_symlink("dl")
    assert (tmp_path / "root" / "dl").readlink() == pathlib.Path("d")  # relative


@pytest.mark.parametrize("make", [MemoryBackend, SharedMemoryBackend])
def test_clear_files_only_keeps_the_directories(make: Any) -> None:
    with make() as backend:
        backend.save(np.zeros(100_000), "a/big.npy", metadata={"k": 1})
        backend.save("text", "a/b/t.txt")
        backend.create_symlink("a/b/t.txt", "c/l.txt")
        backend.ensure_directory("e")
        backend.clear_files_only()
        assert backend.list_files("/", recursive=True) == []
        assert backend.list_dir("/") == ["a", "c", "e"] and backend.list_dir("a") == ["b"]
        backend.save(np.ones(2), "a/big.npy")  # no metadata left behind for the new file
        with pytest.raises(FileNotFoundError):
            backend.load_metadata("a/big.npy")


# -- 6: .csv and .pt/.pth ---------------------------------------------------------
@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Any]:
    with MemoryBackend() if request.param == "memory" else DiskBackend(tmp_path) as backend:
        yield backend


def test_csv_rows_of_dicts(store: Any, tmp_path: pathlib.Path) -> None:
    rows = [{"well": "A1", "count": 3, "area": 1.5}, {"well": 'B "2",\n', "count": None}]
    store.save(rows, "t.csv")
    expected = [
        {"well": "A1", "count": "3", "area": "1.5"},
        {"well": 'B "2",\n', "count": "", "area": ""},
    ]
    assert store.load("t.csv") == expected
    if isinstance(store, DiskBackend):  # a plain CSV file that the csv module reads back
        import csv

        with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
            assert list(csv.DictReader(f)) == expected
    store.save([], "empty.csv")
    assert store.load("empty.csv") == []


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.array([[1, 2], [3, 4]], dtype=np.uint8), np.int64),
        (np.array([[True], [False]]), np.int64),
        (np.array([[0.1, np.nan, -np.inf], [1.0, 2.0, 1e-300]]), np.float64),
    ],
)
def test_csv_numeric_tables(store: Any, array: np.ndarray, dtype: Any) -> None:
    store.save(array, "a.csv")
    got = store.load("a.csv")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, array.astype(dtype))


def test_csv_refusals(store: Any, tmp_path: pathlib.Path) -> None:
    from polystore.exceptions import CorruptFileError

    for bad in (np.zeros((2, 2, 2)), np.zeros((0, 3)), np.array([["a"]]), "text", [{"1": 2}]):
        with pytest.raises(UnsupportedFormatError):
            store.save(bad, "bad.csv")
    if isinstance(store, DiskBackend):
        (tmp_path / "ragged.csv").write_text("1,2\n3\n")
        with pytest.raises(CorruptFileError, match="differ in length"):
            store.load("ragged.csv")


def test_torch_files_without_torch(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from polystore.exceptions import MissingDependencyError

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'polystore\[torch\]'"):
        store.save(np.zeros(2), "weights.pt")
    assert not store.exists("weights.pt")


class _FakeTensor:
    """Stands in for torch.Tensor where torch is not installed."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def detach(self) -> _FakeTensor:
        return self

    def clone(self) -> _FakeTensor:
        return _FakeTensor(list(self.values))


def _fake_torch(loads: list[dict[str, Any]]) -> Any:
    import pickle
    import types

    fake = types.ModuleType("torch")
    fake.Tensor = _FakeTensor  # type: ignore[attr-defined]
    fake.save = lambda value, stream: pickle.dump(value, stream)  # type: ignore[attr-defined]

    def load(stream: Any, **kwargs: Any) -> Any:
        loads.append(kwargs)
        return pickle.load(stream)

    fake.load = load  # type: ignore[attr-defined]
    return fake


def test_torch_files_go_through_torch(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(loads))
    tensor = _FakeTensor([1.0, 2.0])
    store.save(tensor, "w.pt")
    store.save({"layer": tensor}, "model.pth")
    tensor.values.append(3.0)  # the stored value is a copy
    assert store.load("w.pt").values == [1.0, 2.0]
    assert store.load("model.pth")["layer"].values == [1.0, 2.0]
    if isinstance(store, DiskBackend):
        assert loads[0] == {"map_location": "cpu", "weights_only": True}
    with pytest.raises(UnsupportedFormatError, match="tensor"):
        store.save([1, 2], "w.pt")


def test_torch_round_trip_with_torch(store: Any) -> None:
    torch = pytest.importorskip("torch")
    store.save({"w": torch.arange(4.0)}, "m.pt")
    assert torch.equal(store.load("m.pt")["w"], torch.arange(4.0))


# -- 2: zarr v2 stores as the original wrote them -------------------------------------
def test_reads_a_zarr_v2_store_laid_out_as_the_original_wrote_it(tmp_path: pathlib.Path) -> None:
    # The original kept an images.zarr store beside the files it stood for:
    # zarr v2, nested chunk keys ("0/0"), numcodecs compressors, arrays named
    # like the files, wells as groups. The default backend (which writes v3)
    # reads it as it is.
    zarr = pytest.importorskip("zarr")
    numcodecs = pytest.importorskip("numcodecs")
    store = tmp_path / "plate" / "images.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    nested = {"name": "v2", "separator": "/"}
    image = group.create_array(
        "A01.tif", shape=(2, 8, 8), chunks=(1, 8, 8), dtype="uint16",
        compressors=numcodecs.Blosc(cname="lz4"), chunk_key_encoding=nested,
        attributes={"channel": "DAPI"},
    )  # fmt: skip
    image[...] = np.arange(128, dtype=np.uint16).reshape(2, 8, 8)
    well = group.create_group("A01").create_array(
        "0", shape=(4, 4), chunks=(2, 2), dtype="float32",
        compressors=numcodecs.Zstd(), chunk_key_encoding=nested,
    )  # fmt: skip
    well[...] = 1.5
    with BackendRegistry() as registry:
        fm = FileManager(registry)
        assert fm.list_files(store, "zarr", recursive=True) == [
            f"{store}/A01.tif",
            f"{store}/A01/0",
        ]
        loaded = fm.load(store / "A01.tif", "zarr")
        np.testing.assert_array_equal(loaded, np.arange(128, dtype=np.uint16).reshape(2, 8, 8))
        assert fm.load_metadata(store / "A01.tif", "zarr") == {"channel": "DAPI"}
        np.testing.assert_array_equal(fm.load(store / "A01/0", "zarr"), np.full((4, 4), 1.5))
