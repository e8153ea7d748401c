"""What a user of the original polystore relies on, kept working (issue 15)."""

from __future__ import annotations

import pathlib
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
