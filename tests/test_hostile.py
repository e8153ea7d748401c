"""Hostile and damaged input, on every backend where it applies.

The files here are written the way an attacker or a crash would leave them:
straight to disk, bypassing the backend under test. Each case checks what
must never happen (a pickle payload running, a link's target vanishing, a
huge allocation from a lying header) as well as the error the caller sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import FileManager, MemoryBackend
from polystore.base import StorageBackend
from polystore.disk import DiskBackend
from polystore.exceptions import UnsupportedFormatError

try:
    import zarr  # noqa: F401 - only whether it is there

    HAVE_ZARR = True
except ImportError:
    HAVE_ZARR = False

BACKENDS = ["disk", "memory", "shm", *(["zarr"] if HAVE_ZARR else [])]
FORMATS = [".npy", ".npz", ".json", ".txt", ".bin"]


@contextlib.contextmanager
def open_backend(name: str, root: Path) -> Iterator[StorageBackend]:
    """A fresh backend of the given kind; ``root`` is its directory when it has one."""
    if name == "disk":
        yield DiskBackend(root)
    elif name == "memory":
        with MemoryBackend() as memory:
            yield memory
    elif name == "shm":
        from polystore.shm_backend import SharedMemoryBackend

        with SharedMemoryBackend() as shm:
            yield shm
    else:
        from polystore.zarr_backend import ZarrBackend

        with ZarrBackend(root) as store:
            yield store


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FileManager]:
    """Every backend at once: disk in ``tmp_path/disk``, zarr in ``tmp_path/zarr``."""
    with contextlib.ExitStack() as stack:
        backends = {}
        for name in BACKENDS:
            root = tmp_path / name
            root.mkdir()
            backends[name] = stack.enter_context(open_backend(name, root))
        yield FileManager(backends)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    with open_backend(request.param, tmp_path) as opened:
        yield opened


# -- copy and move never unpickle ----------------------------------------------------


class _Payload:
    """An object whose unpickling creates the directory ``marker``: proof that pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def _plant(directory: Path, name: str, marker: Path) -> Path:
    """Write a .npy or .npz holding a pickled payload, as a stranger could."""
    evil = np.array([_Payload(marker), 1], dtype=object)
    path = directory / name
    with open(path, "wb") as f:
        if name.endswith(".npz"):
            np.savez(f, allow_pickle=True, data=evil)
        else:
            np.save(f, evil, allow_pickle=True)
    return path


@pytest.mark.parametrize("op", ["copy", "move"])
@pytest.mark.parametrize("dst_ext", FORMATS)
@pytest.mark.parametrize("src_ext", [".npy", ".npz"])
@pytest.mark.parametrize("dst_backend", BACKENDS)
def test_copy_and_move_never_unpickle(
    manager: FileManager, tmp_path: Path, op: str, src_ext: str, dst_ext: str, dst_backend: str
) -> None:
    marker = tmp_path / "payload-ran"
    planted = _plant(tmp_path / "disk", "evil" + src_ext, marker)
    before = planted.read_bytes()
    dst = "out/copy" + dst_ext
    call = manager.copy if op == "copy" else manager.move
    byte_for_byte = dst_backend == "disk" and dst_ext == src_ext
    if byte_for_byte:
        # The same format on disk is copied (or renamed) as bytes: nothing is decoded.
        call("evil" + src_ext, dst, "disk", dst_backend=dst_backend)
        assert (tmp_path / "disk" / dst).read_bytes() == before
    else:
        with pytest.raises(UnsupportedFormatError, match="pickle"):
            call("evil" + src_ext, dst, "disk", dst_backend=dst_backend)
        assert planted.read_bytes() == before, "the source must stay where it was"
        assert not manager.exists(dst, backend=dst_backend)
    assert not marker.exists(), "the pickle payload ran"


def test_the_payload_is_live(manager: FileManager, tmp_path: Path) -> None:
    # Without this, the matrix above could pass with a payload that never runs.
    marker = tmp_path / "payload-ran"
    _plant(tmp_path / "disk", "evil.npy", marker)
    manager.copy("evil.npy", "trusted.npy", "disk", dst_backend="memory", allow_pickle=True)
    assert marker.is_dir()


@pytest.mark.parametrize("dst_backend", BACKENDS)
def test_copy_of_stored_objects_needs_allow_pickle(
    manager: FileManager, tmp_path: Path, dst_backend: str
) -> None:
    # An object array the caller stored on purpose still needs allow_pickle
    # to leave the memory backend: elsewhere it would be written with pickle.
    objects = np.array([{"a": 1}, None], dtype=object)
    manager.save(objects, "objects.npy", backend="memory", allow_pickle=True)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        manager.copy("objects.npy", "out/objects.npy", "memory", dst_backend=dst_backend)
    assert not manager.exists("out/objects.npy", backend=dst_backend)


# -- symbolic links: delete removes the link, never its target ------------------------


@pytest.fixture(params=["root", "no-root"])
def linked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DiskBackend, Path, str]:
    """A disk backend, the directory its paths name, and the prefix that names it."""
    area = tmp_path / "area"
    area.mkdir()
    if request.param == "root":
        return DiskBackend(area), area, ""
    return DiskBackend(), area, str(area) + "/"


def _target_tree(tmp_path: Path) -> Path:
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    np.save(target / "a.npy", np.arange(3))
    np.save(target / "sub" / "b.npy", np.arange(4))
    return target


def _tree(path: Path) -> list[str]:
    """What is below ``path``, polystore's own lock and metadata files left out."""
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if not p.name.startswith(".polystore-")
    )


@pytest.mark.parametrize("recursive", [False, True])
def test_delete_a_link_to_a_directory(
    linked: tuple[DiskBackend, Path, str], tmp_path: Path, recursive: bool
) -> None:
    disk, area, prefix = linked
    target = _target_tree(area)
    (area / "link").symlink_to(target, target_is_directory=True)
    disk.delete(prefix + "link", recursive=recursive)
    assert not os.path.lexists(area / "link")
    assert _tree(target) == ["a.npy", "sub", "sub/b.npy"]


def test_delete_a_link_to_a_file(linked: tuple[DiskBackend, Path, str]) -> None:
    disk, area, prefix = linked
    target = _target_tree(area)
    (area / "link.npy").symlink_to(target / "a.npy")
    disk.delete(prefix + "link.npy")
    assert not os.path.lexists(area / "link.npy")
    np.testing.assert_array_equal(np.load(target / "a.npy"), np.arange(3))


def test_delete_a_dangling_link(linked: tuple[DiskBackend, Path, str]) -> None:
    disk, area, prefix = linked
    (area / "dangling.npy").symlink_to(area / "nothing-here.npy")
    disk.delete(prefix + "dangling.npy")
    assert not os.path.lexists(area / "dangling.npy")


def test_delete_a_link_leading_out_of_the_root(tmp_path: Path) -> None:
    # The link lies inside the sandbox; removing it touches nothing outside.
    area = tmp_path / "area"
    area.mkdir()
    outside = _target_tree(tmp_path)
    (area / "out").symlink_to(outside, target_is_directory=True)
    DiskBackend(area).delete("out", recursive=True)
    assert not os.path.lexists(area / "out")
    assert _tree(outside) == ["a.npy", "sub", "sub/b.npy"]


def test_recursive_delete_never_follows_links(linked: tuple[DiskBackend, Path, str]) -> None:
    disk, area, prefix = linked
    target = _target_tree(area)
    (area / "tree" / "deeper").mkdir(parents=True)
    np.save(area / "tree" / "own.npy", np.ones(2))
    (area / "tree" / "to-dir").symlink_to(target, target_is_directory=True)
    (area / "tree" / "deeper" / "to-file.npy").symlink_to(target / "a.npy")
    disk.delete(prefix + "tree", recursive=True)
    assert not os.path.lexists(area / "tree")
    assert _tree(target) == ["a.npy", "sub", "sub/b.npy"]


def test_delete_through_a_linked_directory(linked: tuple[DiskBackend, Path, str]) -> None:
    # Links before the last name are followed, as they are by rm.
    disk, area, prefix = linked
    target = _target_tree(area)
    (area / "link").symlink_to(target, target_is_directory=True)
    disk.delete(prefix + "link/a.npy")
    assert _tree(target) == ["sub", "sub/b.npy"]
    assert (area / "link").is_symlink()
