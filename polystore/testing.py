"""The conformance suite every backend passes.

Subclass :class:`BackendTests` in a pytest module, provide a ``backend``
fixture that returns a fresh, empty backend, and the two raw helpers that read
and write the backend's storage without going through the backend::

    import pytest
    from polystore.testing import BackendTests

    class TestMyBackend(BackendTests):
        @pytest.fixture
        def backend(self, tmp_path):
            with MyBackend(tmp_path) as b:
                yield b

        def raw_get(self, backend, path):
            ...  # the value stored at path, read with the storage's own tools

        def raw_set(self, backend, path, value):
            ...  # store value at path with the storage's own tools

The tests check the rules that hold on every polystore backend, with relative
POSIX paths, and check what the backend writes and reads against the raw
helpers, so a backend that is wrong in a self-consistent way fails. What the
backend can do is read from its capabilities
(:attr:`~polystore.StorageBackend.extensions`,
:attr:`~polystore.StorageBackend.supports_metadata`,
:attr:`~polystore.StorageBackend.arrays_under_any_name`,
:attr:`~polystore.StorageBackend.shareable`). pytest is imported only by this
module, never by ``import polystore``.
"""

from __future__ import annotations

import errno
import pathlib
from typing import Any, NoReturn

import numpy as np

from .base import StorageBackend
from .exceptions import MissingDependencyError

try:
    import pytest
except ImportError:  # pragma: no cover - exercised in a fresh interpreter by the tests
    raise MissingDependencyError("pytest>=7.4", "test") from None

from ._testing_create import CreateArrayTests
from ._testing_links import LinkTests
from ._testing_processes import ProcessBoundaryTests
from .exceptions import (
    BackendNotFoundError,
    CorruptFileError,
    LockRequiredError,
    LockTimeoutError,
    MetadataNotFoundError,
    NotShareableError,
    ReservedNameError,
    SandboxError,
    SharedValueReleasedError,
    ShmFullError,
    StorageError,
    StoreClosedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)

__all__ = ["SAMPLES", "BackendTests", "assert_same_value"]

#: one value per built-in extension, as the backend should load it back
SAMPLES: dict[str, Any] = {
    ".npy": np.arange(24, dtype=np.float32).reshape(4, 6),
    ".npz": {"image": np.ones((3, 3), dtype=np.uint16), "labels": np.arange(5)},
    ".json": {"name": "plate-1", "wells": [1, 2, 3], "nested": {"ok": True, "x": None}},
    ".txt": "line one\nline two \u00e9\u4e2d\n",
    ".bin": b"\x00\x01binary\xff",
}


def _no_raw_helpers(suite: object) -> NoReturn:
    pytest.skip(
        f"{type(suite).__name__} defines no raw_get/raw_set, so this backend cannot be "
        "checked against its storage, only against itself"
    )


def assert_same_value(got: Any, expected: Any) -> None:
    """Assert that a loaded value equals the saved one, arrays included."""
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, dict) and any(isinstance(v, np.ndarray) for v in expected.values()):
        assert isinstance(got, dict)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert_same_value(got[key], expected[key])
    else:
        assert got == expected
        assert type(got) is type(expected)


class BackendTests(ProcessBoundaryTests, CreateArrayTests, LinkTests):
    """Tests of the shared semantics.

    Subclasses provide a ``backend`` fixture and the raw helpers
    :meth:`raw_get` and :meth:`raw_set`.
    """

    @pytest.fixture
    def backend(self) -> StorageBackend:
        raise NotImplementedError("subclasses of BackendTests provide a 'backend' fixture")

    # -- raw helpers: the storage itself, without the backend under test --------
    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        """The value stored at ``path``, read without calling ``backend``'s methods.

        Raises:
            FileNotFoundError: nothing is stored there.
        """
        _no_raw_helpers(self)

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:
        """Store ``value`` at ``path`` (parents included) without calling ``backend``'s methods."""
        _no_raw_helpers(self)

    def _raw_missing(self, backend: StorageBackend, path: str) -> bool:
        try:
            self.raw_get(backend, path)
        except FileNotFoundError:
            return True
        return False

    @pytest.fixture
    def array_name(self) -> str:
        return "x.npy"

    # -- round trips --------------------------------------------------------
    @pytest.mark.parametrize("ext", list(SAMPLES))
    def test_round_trip_each_format(self, backend: StorageBackend, ext: str) -> None:
        if ext not in backend.extensions:
            with pytest.raises(UnsupportedFormatError):
                backend.save(SAMPLES[ext], f"d/value{ext}")
            assert not backend.exists(f"d/value{ext}")
            return
        backend.save(SAMPLES[ext], f"d/value{ext}")
        assert_same_value(backend.load(f"d/value{ext}"), SAMPLES[ext])

    @pytest.mark.parametrize(
        "array",
        [
            np.arange(10, dtype=np.int64),
            np.zeros((0, 3), dtype=np.float64),
            np.array(3.5, dtype=np.float32),
            np.array([[True, False]]),
            (np.arange(6) + 1j).reshape(2, 3),
            np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
            np.arange(20, dtype=np.uint8)[::3],
            np.array(["ab", "cde"]),
            np.zeros(3, dtype=[("x", "<f4"), ("y", "<i2")]),
        ],
        ids=["int64", "empty", "0d", "bool", "complex", "fortran", "strided", "unicode", "record"],
    )
    def test_round_trip_arrays(self, backend: StorageBackend, array: np.ndarray) -> None:
        backend.save(array, "arrays/a.npy")
        assert_same_value(backend.load("arrays/a.npy"), array)

    def test_large_array(self, backend: StorageBackend) -> None:
        big = np.random.default_rng(0).random((512, 1024), dtype=np.float32)  # 2 MB
        backend.save(big, "big.npy")
        assert_same_value(backend.load("big.npy"), big)

    def test_stores_a_copy(self, backend: StorageBackend) -> None:
        data = np.zeros(4)
        backend.save(data, "copy.npy")
        data[:] = 7
        assert_same_value(backend.load("copy.npy"), np.zeros(4))

    def test_loaded_values_are_independent(self, backend: StorageBackend) -> None:
        if ".json" not in backend.extensions:
            pytest.skip("backend stores no JSON")
        backend.save({"a": [1]}, "v.json")
        first = backend.load("v.json")
        first["a"].append(2)
        assert backend.load("v.json") == {"a": [1]}

    def test_object_arrays_need_allow_pickle(self, backend: StorageBackend) -> None:
        objects = np.array([{"a": 1}, None], dtype=object)
        with pytest.raises(UnsupportedFormatError, match="pickle"):
            backend.save(objects, "obj.npy")
        assert not backend.exists("obj.npy")

    def test_a_misspelt_option_is_refused_not_dropped(self, backend: StorageBackend) -> None:
        # metdata= or overwrit= silently ignored would lose metadata or
        # overwrite a file: every backend refuses what it does not take.
        backend.save(np.zeros(2), "opt.npy")
        with pytest.raises(TypeError, match="overwrit"):
            backend.save(np.ones(2), "opt.npy", overwrit=False)
        with pytest.raises(TypeError, match="metdata"):
            backend.save(np.ones(2), "new.npy", metdata={"a": 1})
        assert not backend.exists("new.npy")
        assert_same_value(backend.load("opt.npy"), np.zeros(2))
        with pytest.raises(TypeError, match="allow_pickel"):
            backend.load("opt.npy", allow_pickel=True)
        with (
            pytest.raises(TypeError, match="metdata"),
            backend.create_array("made.npy", 2, metdata={"a": 1}),
        ):
            raise AssertionError("the block must not start")
        assert not backend.exists("made.npy")
        backend.load("opt.npy", allow_pickle=True)  # taken everywhere

    def test_unknown_extension(self, backend: StorageBackend) -> None:
        if backend.arrays_under_any_name:
            pytest.skip("backend stores arrays under any name")
        for name in ("file.unknown-ext", "no_extension"):
            with pytest.raises(UnsupportedFormatError):
                backend.save(np.zeros(2), name)
            assert not backend.exists(name)

    def test_wrong_value_for_format(self, backend: StorageBackend) -> None:
        if ".txt" in backend.extensions:
            with pytest.raises(UnsupportedFormatError):
                backend.save(b"bytes are not text", "t.txt")
        if ".json" in backend.extensions:
            with pytest.raises(UnsupportedFormatError):
                backend.save({"s": {1, 2}}, "j.json")
        assert backend.list_files(".", recursive=True) == []

    def test_pathlike_and_unicode_paths(self, backend: StorageBackend) -> None:
        path = pathlib.PurePosixPath("dir with space") / "\u00e9t\u00e9.npy"
        backend.save(np.ones(2), path)
        assert backend.is_file(path)
        assert backend.is_file(str(path))
        assert_same_value(backend.load(path), np.ones(2))

    def test_reserved_names(self, backend: StorageBackend) -> None:
        for path in (".polystore-x.npy", "d/.polystore-lock/x.npy"):
            with pytest.raises(ReservedNameError):
                backend.save(np.ones(1), path)
            with pytest.raises(ReservedNameError):
                backend.load(path)
        assert backend.list_files(".", recursive=True) == []

    # -- save semantics -----------------------------------------------------
    def test_save_creates_parents(self, backend: StorageBackend) -> None:
        backend.save(np.ones(1), "a/b/c/x.npy")
        assert backend.is_dir("a") and backend.is_dir("a/b") and backend.is_dir("a/b/c")
        assert backend.is_file("a/b/c/x.npy")

    def test_overwrite_replaces(self, backend: StorageBackend) -> None:
        backend.save(np.ones(3), "o.npy")
        backend.save(np.zeros(5), "o.npy")
        assert_same_value(backend.load("o.npy"), np.zeros(5))

    def test_overwrite_false_refuses(self, backend: StorageBackend) -> None:
        backend.save(np.ones(3), "o.npy")
        with pytest.raises(FileExistsError):
            backend.save(np.zeros(3), "o.npy", overwrite=False)
        assert_same_value(backend.load("o.npy"), np.ones(3))
        backend.save(np.zeros(2), "new.npy", overwrite=False)
        assert backend.is_file("new.npy")

    def test_save_onto_directory(self, backend: StorageBackend) -> None:
        backend.ensure_directory("dir.npy")
        with pytest.raises(IsADirectoryError):
            backend.save(np.ones(1), "dir.npy")
        assert backend.is_dir("dir.npy")

    def test_save_through_a_file(self, backend: StorageBackend) -> None:
        backend.save(np.ones(1), "f.npy")
        with pytest.raises(NotADirectoryError):
            backend.save(np.ones(1), "f.npy/child.npy")
        assert backend.is_file("f.npy")

    # -- load and queries ---------------------------------------------------
    def test_load_missing(self, backend: StorageBackend) -> None:
        with pytest.raises(FileNotFoundError):
            backend.load("missing.npy")
        with pytest.raises(FileNotFoundError):
            backend.load("no/such/dir/missing.npy")

    @pytest.mark.parametrize("name", ["d.npy", "d", "d.unknown-ext"])
    def test_load_directory(self, backend: StorageBackend, name: str) -> None:
        # whatever the name: a directory is never mistaken for a badly named file
        backend.ensure_directory(name)
        with pytest.raises(IsADirectoryError):
            backend.load(name)
        with pytest.raises(IsADirectoryError):
            backend.copy(name, "copy.npy")
        assert not backend.exists("copy.npy")

    def test_exists_is_file_is_dir(self, backend: StorageBackend) -> None:
        backend.save(np.ones(1), "q/f.npy")
        assert backend.exists("q") and backend.is_dir("q") and not backend.is_file("q")
        assert backend.exists("q/f.npy") and backend.is_file("q/f.npy")
        assert not backend.is_dir("q/f.npy")
        for missing in ("nothing", "q/nothing.npy", "q/f.npy/below"):
            assert backend.exists(missing) is False
            assert backend.is_file(missing) is False
            assert backend.is_dir(missing) is False

    @pytest.mark.parametrize("bad", [123, None, b"bytes/path.npy", 4.5, ["a"]])
    def test_bad_path_types(self, backend: StorageBackend, bad: Any) -> None:
        with pytest.raises(TypeError):
            backend.save(np.ones(1), bad)
        with pytest.raises(TypeError):
            backend.load(bad)
        with pytest.raises(TypeError):
            backend.exists(bad)
        with pytest.raises(TypeError):
            backend.list_files(bad)
        with pytest.raises(TypeError):
            backend.delete(bad)

    # -- listing ------------------------------------------------------------
    def _populate(self, backend: StorageBackend) -> None:
        for name in ("b.npy", "a.npy", "C.NPY", "sub/d.npy", "sub/deeper/e.npy"):
            backend.save(np.ones(1), f"root/{name}")
        backend.ensure_directory("root/empty")

    def test_list_files_sorted_strings(self, backend: StorageBackend) -> None:
        self._populate(backend)
        files = backend.list_files("root")
        assert files == ["root/C.NPY", "root/a.npy", "root/b.npy"]
        assert all(type(f) is str for f in files)
        for path in files:
            assert backend.is_file(path)

    def test_list_files_recursive(self, backend: StorageBackend) -> None:
        self._populate(backend)
        assert backend.list_files("root", recursive=True) == [
            "root/C.NPY",
            "root/a.npy",
            "root/b.npy",
            "root/sub/d.npy",
            "root/sub/deeper/e.npy",
        ]
        assert backend.list_files("root/", recursive=True)[0] == "root/C.NPY"

    def test_list_files_filters(self, backend: StorageBackend) -> None:
        self._populate(backend)
        assert backend.list_files("root", pattern="[ab].npy") == ["root/a.npy", "root/b.npy"]
        assert backend.list_files("root", extensions={".npy"}) == [
            "root/C.NPY",
            "root/a.npy",
            "root/b.npy",
        ]
        assert backend.list_files("root", extensions={"NPY"}, recursive=True)[-1] == (
            "root/sub/deeper/e.npy"
        )
        assert backend.list_files("root", extensions={".json"}) == []
        assert backend.list_files("root", pattern="*.npy", recursive=True, extensions=[".npy"])

    def test_list_files_errors(self, backend: StorageBackend) -> None:
        self._populate(backend)
        with pytest.raises(FileNotFoundError):
            backend.list_files("nowhere")
        with pytest.raises(NotADirectoryError):
            backend.list_files("root/a.npy")
        assert backend.list_files("root/empty") == []

    def test_list_dir(self, backend: StorageBackend) -> None:
        self._populate(backend)
        assert backend.list_dir("root") == ["C.NPY", "a.npy", "b.npy", "empty", "sub"]
        assert backend.list_dir("root/empty") == []
        with pytest.raises(FileNotFoundError):
            backend.list_dir("nowhere")
        with pytest.raises(NotADirectoryError):
            backend.list_dir("root/a.npy")

    # -- directories and deletion ---------------------------------------------
    def test_ensure_directory(self, backend: StorageBackend) -> None:
        assert backend.ensure_directory("e/f/g") == "e/f/g"
        assert backend.ensure_directory(pathlib.PurePosixPath("e/f/g")) == "e/f/g"
        assert backend.is_dir("e/f")
        backend.save(np.ones(1), "e/file.npy")
        with pytest.raises(FileExistsError):
            backend.ensure_directory("e/file.npy")
        with pytest.raises(NotADirectoryError):
            backend.ensure_directory("e/file.npy/below")

    def test_delete(self, backend: StorageBackend) -> None:
        self._populate(backend)
        backend.delete("root/a.npy")
        assert not backend.exists("root/a.npy")
        backend.delete("root/empty")
        assert not backend.exists("root/empty")
        with pytest.raises(OSError) as info:
            backend.delete("root/sub")
        assert info.value.errno == errno.ENOTEMPTY
        assert backend.is_file("root/sub/d.npy")
        backend.delete("root/sub", recursive=True)
        assert not backend.exists("root/sub")
        assert backend.list_files("root", recursive=True) == ["root/C.NPY", "root/b.npy"]
        with pytest.raises(FileNotFoundError):
            backend.delete("root/sub")

    def test_copy_and_move(self, backend: StorageBackend) -> None:
        backend.save(np.arange(3), "src/a.npy")
        backend.copy("src/a.npy", "dst/b.npy")
        assert_same_value(backend.load("dst/b.npy"), np.arange(3))
        assert backend.is_file("src/a.npy")
        backend.move("src/a.npy", "dst/c.npy")
        assert not backend.exists("src/a.npy")
        assert backend.list_files("dst") == ["dst/b.npy", "dst/c.npy"]
        with pytest.raises(FileNotFoundError):
            backend.copy("src/a.npy", "x.npy")
        with pytest.raises(FileExistsError):
            backend.copy("dst/b.npy", "dst/c.npy", overwrite=False)

    def test_copy_and_move_onto_itself(self, backend: StorageBackend) -> None:
        backend.save(np.arange(3), "same/a.npy")
        backend.move("same/a.npy", "same/./a.npy")
        backend.copy("same/a.npy", "same/a.npy")
        assert_same_value(backend.load("same/a.npy"), np.arange(3))
        with pytest.raises(FileExistsError):
            backend.move("same/a.npy", "same/a.npy", overwrite=False)
        assert backend.list_files("same") == ["same/a.npy"]

    # -- batches --------------------------------------------------------------
    def test_batches(self, backend: StorageBackend) -> None:
        arrays = [np.full(3, i) for i in range(4)]
        paths = [f"batch/{i}.npy" for i in range(4)]
        backend.save_batch(arrays, paths)
        for got, expected in zip(backend.load_batch(paths), arrays, strict=False):
            assert_same_value(got, expected)

    def test_batch_length_mismatch_saves_nothing(self, backend: StorageBackend) -> None:
        with pytest.raises(ValueError):
            backend.save_batch([np.ones(1), np.ones(1)], ["m/1.npy"])
        assert not backend.exists("m")

    # -- metadata ------------------------------------------------------------
    @staticmethod
    def _need_metadata(backend: StorageBackend) -> None:
        if not backend.supports_metadata:
            pytest.skip("backend stores no metadata")

    def test_metadata_round_trip(self, backend: StorageBackend) -> None:
        self._need_metadata(backend)
        meta = {"channel": "DAPI", "z": [0, 1], "scale": 0.5}
        backend.save(np.ones(2), "m/a.npy", metadata=meta)
        assert backend.load_metadata("m/a.npy") == meta
        assert backend.list_files("m") == ["m/a.npy"]
        assert backend.list_dir("m") == ["a.npy"]

    def test_metadata_missing(self, backend: StorageBackend) -> None:
        self._need_metadata(backend)
        backend.save(np.ones(2), "m/plain.npy")
        with pytest.raises(MetadataNotFoundError):
            backend.load_metadata("m/plain.npy")
        with pytest.raises(FileNotFoundError):
            backend.load_metadata("m/missing.npy")

    def test_metadata_replaced_with_the_file(self, backend: StorageBackend) -> None:
        self._need_metadata(backend)
        backend.save(np.ones(2), "m/a.npy", metadata={"v": 1})
        backend.save(np.ones(2), "m/a.npy", metadata={"v": 2})
        assert backend.load_metadata("m/a.npy") == {"v": 2}
        backend.save(np.ones(2), "m/a.npy")
        with pytest.raises(MetadataNotFoundError):
            backend.load_metadata("m/a.npy")

    def test_bad_metadata_writes_nothing(self, backend: StorageBackend) -> None:
        self._need_metadata(backend)
        with pytest.raises((TypeError, ValueError)):
            backend.save(np.ones(2), "m/a.npy", metadata={"bad": object()})
        with pytest.raises(TypeError):
            backend.save(np.ones(2), "m/a.npy", metadata=["not", "a", "dict"])  # type: ignore[arg-type]
        for not_json in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError):
                backend.save(np.ones(2), "m/a.npy", metadata={"scale": [1.0, not_json]})
        assert not backend.exists("m/a.npy")

    def test_metadata_follows_copy_move_delete(self, backend: StorageBackend) -> None:
        self._need_metadata(backend)
        backend.save(np.ones(2), "m/a.npy", metadata={"v": 1})
        backend.copy("m/a.npy", "m/b.npy")
        backend.move("m/a.npy", "m/c.npy")
        assert backend.load_metadata("m/b.npy") == {"v": 1}
        assert backend.load_metadata("m/c.npy") == {"v": 1}
        with pytest.raises(MetadataNotFoundError):
            backend.load_metadata("m/a.npy")
        backend.delete("m/c.npy")
        backend.save(np.ones(2), "m/c.npy")
        with pytest.raises(MetadataNotFoundError):
            backend.load_metadata("m/c.npy")

    # -- against the storage itself (raw helpers) -------------------------------
    @pytest.mark.parametrize("ext", list(SAMPLES))
    def test_saved_values_land_in_the_storage(self, backend: StorageBackend, ext: str) -> None:
        if ext not in backend.extensions:
            pytest.skip(f"backend stores no {ext}")
        backend.save(SAMPLES[ext], f"raw/value{ext}")
        assert_same_value(self.raw_get(backend, f"raw/value{ext}"), SAMPLES[ext])

    @pytest.mark.parametrize("ext", list(SAMPLES))
    def test_loads_what_the_storage_holds(self, backend: StorageBackend, ext: str) -> None:
        if ext not in backend.extensions:
            pytest.skip(f"backend stores no {ext}")
        path = f"raw/sub/value{ext}"
        self.raw_set(backend, path, SAMPLES[ext])
        assert backend.is_dir("raw/sub") and backend.is_file(path)
        assert backend.list_files("raw", recursive=True) == [path]
        assert backend.list_dir("raw") == ["sub"]
        assert_same_value(backend.load(path), SAMPLES[ext])

    def test_changes_reach_the_storage(self, backend: StorageBackend) -> None:
        self.raw_set(backend, "w/old.npy", np.arange(3))
        with pytest.raises(FileExistsError):
            backend.save(np.zeros(3), "w/old.npy", overwrite=False)
        assert_same_value(self.raw_get(backend, "w/old.npy"), np.arange(3))
        backend.save(np.zeros(2), "w/old.npy")
        assert_same_value(self.raw_get(backend, "w/old.npy"), np.zeros(2))
        backend.copy("w/old.npy", "w/copy.npy")
        assert_same_value(self.raw_get(backend, "w/copy.npy"), np.zeros(2))
        backend.move("w/copy.npy", "w/moved.npy")
        assert self._raw_missing(backend, "w/copy.npy")
        assert_same_value(self.raw_get(backend, "w/moved.npy"), np.zeros(2))
        backend.delete("w/moved.npy")
        assert self._raw_missing(backend, "w/moved.npy")
        backend.delete("w", recursive=True)
        assert self._raw_missing(backend, "w/old.npy")


#: every exception class polystore defines, with sample arguments (for pickling tests)
EXCEPTION_SAMPLES: list[BaseException] = [
    StorageError("plain"),
    BackendNotFoundError("nope", ["disk", "memory"]),
    UnsupportedFormatError("x.abc", [".npy"], "unknown extension"),
    CorruptFileError("a/b.npy", "the header declares 8 bytes of data, the file holds 2"),
    MetadataNotFoundError("a/b.npy"),
    SandboxError("../etc", "/data"),
    LockTimeoutError("a.json", 1.5),
    NotShareableError("local only"),
    ShmFullError(100, 10, "/dev/shm"),
    SharedValueReleasedError("frame", "polystore-store"),
    StoreClosedError("closed"),
    StoreNotFoundError("no shared array store named 'x' in /dev/shm"),
    MissingDependencyError("zarr>=3", "zarr"),
    MissingDependencyError("plugin_lib", None, "backend 'x' (plugin:Backend)"),
    LockRequiredError("memory://a.zarr", "unaligned region"),
    ReservedNameError("a/.polystore-x", ".polystore-"),
]
