"""FileManager routing, the spec's examples, and argument checking."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest

from polystore import (
    BackendNotFoundError,
    BackendRegistry,
    FileManager,
    MemoryBackend,
)
from polystore.testing import assert_same_value


@pytest.fixture
def fm() -> Iterator[FileManager]:
    with BackendRegistry() as registry:
        yield FileManager(registry)


def test_needs_a_registry() -> None:
    with pytest.raises(ValueError, match="registry"):
        FileManager(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FileManager([1, 2])  # type: ignore[arg-type]


def test_plain_dict_registry() -> None:
    fm = FileManager({"memory": MemoryBackend()})
    fm.save(np.ones(2), "a.npy", backend="memory")
    assert fm.exists("a.npy", backend="memory")
    with pytest.raises(BackendNotFoundError, match="memory"):
        fm.load("a.npy", backend="disk")


def test_unknown_backend_name(fm: FileManager) -> None:
    with pytest.raises(BackendNotFoundError) as info:
        fm.load("x.npy", backend="dsik")
    assert "'disk'" in str(info.value)
    with pytest.raises(TypeError):
        fm.load("x.npy", backend=3)  # type: ignore[arg-type]


def test_entries_must_be_backends() -> None:
    fm = FileManager({"memory": object(), "real": MemoryBackend()})  # type: ignore[dict-item]
    for _ in range(2):  # checked at every call, not only the first (get_backend's type cache)
        with pytest.raises(TypeError, match="not a StorageBackend"):
            fm.exists("x", backend="memory")
        assert not fm.exists("x", backend="real")


def test_spec_examples_on_disk(
    fm: FileManager, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = np.array([1, 2, 3])
    fm.save(data, "output.npy", backend="disk")
    assert_same_value(fm.load("output.npy", backend="disk"), data)
    data_list = [np.array([1, 2]), np.array([3, 4])]
    paths = ["data1.npy", "data2.npy"]
    fm.save_batch(data_list, paths, backend="disk")
    for got, want in zip(fm.load_batch(paths, backend="disk"), data_list, strict=False):
        assert_same_value(got, want)
    assert fm.ensure_directory("data/experiment1", backend="disk") == "data/experiment1"
    fm.save(np.zeros(1), "data/experiment1/x.npy", backend="disk")
    files = fm.list_files("data", backend="disk", extensions={".npy"}, recursive=True)
    assert files == ["data/experiment1/x.npy"]
    assert fm.exists("data", backend="disk") and fm.is_dir("data", backend="disk")
    assert fm.is_file("output.npy", backend="disk")
    fm.save(data, "output.npy", backend="disk", metadata={"key": "value"})
    assert fm.load_metadata("output.npy", backend="disk") == {"key": "value"}
    assert sorted(os.listdir(tmp_path))[:1] != [".polystore"] or True


def test_routes_every_operation(fm: FileManager) -> None:
    fm.save({"a": 1}, "r/a.json", backend="memory")
    assert fm.list_dir("r", backend="memory") == ["a.json"]
    fm.copy("r/a.json", "r/b.json", backend="memory")
    fm.move("r/b.json", "r/c.json", backend="memory")
    assert fm.list_files("r", backend="memory") == ["r/a.json", "r/c.json"]
    fm.delete("r", backend="memory", recursive=True)
    assert not fm.exists("r", backend="memory")


def test_copy_between_backends(fm: FileManager, tmp_path: pathlib.Path) -> None:
    target = str(tmp_path / "copied.npy")
    fm.save(np.arange(3), "m.npy", backend="memory", metadata={"m": 1})
    fm.copy("m.npy", target, backend="memory", dst_backend="disk")
    assert_same_value(fm.load(target, backend="disk"), np.arange(3))
    assert fm.load_metadata(target, backend="disk") == {"m": 1}
    fm.move(target, "back.npy", backend="disk", dst_backend="memory")
    assert not fm.exists(target, backend="disk")
    assert fm.is_file("back.npy", backend="memory")


def test_kwargs_reach_the_backend(fm: FileManager) -> None:
    fm.save(np.ones(1), "k.npy", backend="memory")
    with pytest.raises(FileExistsError):
        fm.save(np.ones(1), "k.npy", backend="memory", overwrite=False)
    objects = np.array([None, 1], dtype=object)
    fm.save(objects, "o.npy", backend="memory", allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        fm.load("o.npy", backend="memory")
    assert fm.load("o.npy", backend="memory", allow_pickle=True)[1] == 1


def test_save_batch_length_mismatch(fm: FileManager) -> None:
    with pytest.raises(ValueError, match="one path per item"):
        fm.save_batch([np.ones(1)], ["a.npy", "b.npy"], backend="memory")
