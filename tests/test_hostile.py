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
from polystore.shm_backend import SharedMemoryBackend

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
