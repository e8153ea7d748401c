"""Hostile and damaged input, on every backend where it applies.

The files here are written the way an attacker or a crash would leave them:
straight to disk, bypassing the backend under test. Each case checks what
must never happen (a pickle payload running, a link's target vanishing, a
huge allocation from a lying header) as well as the error the caller sees.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import FileManager, MemoryBackend
from polystore.base import StorageBackend
from polystore.disk import DiskBackend
from polystore.exceptions import CorruptFileError, UnsupportedFormatError

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


# -- damaged and crafted files -------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _lying_npy(shape: tuple[int, ...], dtype: str = "<f8", tail: bytes = b"\0" * 16) -> bytes:
    """A .npy header declaring ``shape``, followed by a few bytes instead of the data."""
    from numpy.lib import format as npf

    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + tail


def _npz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


GOOD_NPY = _npy_bytes(np.arange(1000, dtype=np.float64))
GOOD_NPZ = _npz_bytes({"a.npy": GOOD_NPY})
TIB8 = (1 << 40,)  # float64: 8 TiB

DAMAGED: dict[str, tuple[str, bytes, str]] = {
    # case: (file name, content, a word the message must contain)
    "empty-npy": ("x.npy", b"", "empty"),
    "truncated-npy": ("x.npy", GOOD_NPY[: len(GOOD_NPY) // 2], "truncated"),
    "truncated-magic": ("x.npy", GOOD_NPY[:5], ".npy"),
    "not-npy": ("x.npy", b"hello, I am text, not an array", ".npy"),
    "bad-header": ("x.npy", GOOD_NPY[:10] + b"{'descr': 1}".ljust(118) + b"\n", ".npy"),
    "negative-shape": ("x.npy", _lying_npy((-5,)), "shape"),
    "npy-8TiB": ("x.npy", _lying_npy(TIB8), "8796093022208 bytes"),
    "empty-npz": ("x.npz", b"", "empty"),
    "garbage-npz": ("x.npz", b"PK\x03\x04 definitely not a zip archive", ".npz"),
    "truncated-npz": ("x.npz", GOOD_NPZ[: len(GOOD_NPZ) // 2], ".npz"),
    "npz-8TiB-member": ("x.npz", _npz_bytes({"a.npy": _lying_npy(TIB8)}), "8796093022208"),
    "npz-foreign-member": ("x.npz", _npz_bytes({"notes.txt": b"hi"}), "notes.txt"),
    "deep-json": ("x.json", b"[" * 100_000 + b"]" * 100_000, "deeply"),
    "bad-json": ("x.json", b'{"a": ', "JSON"),
    "latin1-json": ("x.json", '{"a": "\u00e9"}'.encode("latin-1"), "UTF-8"),
    "latin1-txt": ("x.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_files_raise_corrupt_file_error(tmp_path: Path, case: str) -> None:
    name, content, word = DAMAGED[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(content)
    disk = DiskBackend(tmp_path)
    with pytest.raises(CorruptFileError) as info:
        disk.load("in/" + name)
    assert isinstance(info.value, ValueError)
    assert "in/" + name in str(info.value)
    assert word in str(info.value)
    assert "allow_pickle" not in str(info.value), "damage is not a pickle question"
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is CorruptFileError and str(clone) == str(info.value)


@pytest.mark.parametrize("case", [c for c in DAMAGED if DAMAGED[c][0].endswith(".npy")])
def test_damaged_npy_memory_mapped(tmp_path: Path, case: str) -> None:
    name, content, _ = DAMAGED[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorruptFileError, match=name):
        DiskBackend(tmp_path).load(name, mmap_mode="r")


@pytest.mark.parametrize("case", ["truncated-npy", "npy-8TiB", "npz-8TiB-member", "deep-json"])
@pytest.mark.parametrize("dst_backend", BACKENDS)
def test_damaged_files_are_not_copied(
    manager: FileManager, tmp_path: Path, case: str, dst_backend: str
) -> None:
    name, content, _ = DAMAGED[case]
    (tmp_path / "disk" / name).write_bytes(content)
    targets = {"copy" + Path(name).suffix, "copy.npy", "copy.json"}
    if dst_backend == "disk":
        # Within one format the disk backend copies bytes, decoding nothing, as cp does.
        targets.discard("copy" + Path(name).suffix)
    for dst in sorted(targets):
        with pytest.raises(CorruptFileError, match=name):
            manager.copy(name, "out/" + dst, "disk", dst_backend=dst_backend)
        assert not manager.exists("out/" + dst, backend=dst_backend)


@pytest.mark.parametrize("declared_mib", [256])
def test_no_allocation_from_a_lying_header(tmp_path: Path, declared_mib: int) -> None:
    # A size that could be allocated: the load must refuse before trying.
    (tmp_path / "x.npy").write_bytes(_lying_npy((declared_mib << 17,)))
    (tmp_path / "x.npz").write_bytes(_npz_bytes({"a.npy": _lying_npy((declared_mib << 17,))}))
    disk = DiskBackend(tmp_path)
    for name in ("x.npy", "x.npz"):
        tracemalloc.start()
        try:
            with pytest.raises(CorruptFileError):
                disk.load(name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"{name}: {peak} bytes allocated for {declared_mib} MiB declared"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b"{not json", b"\xff\xfe"])
def test_metadata_that_is_not_an_object(tmp_path: Path, content: bytes) -> None:
    disk = DiskBackend(tmp_path)
    disk.save(np.ones(2), "a.npy", metadata={"ok": True})
    (sidecar,) = [p for p in tmp_path.iterdir() if p.name.startswith(".polystore-meta-")]
    sidecar.write_bytes(content)
    with pytest.raises(CorruptFileError, match=r"a\.npy") as info:
        disk.load_metadata("a.npy")
    assert "metadata" in str(info.value)


def test_deeply_nested_values_are_refused(backend: StorageBackend) -> None:
    if backend.name == "zarr":
        pytest.skip("zarr stores arrays only")
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UnsupportedFormatError, match="nested"):
        backend.save(deep, "deep.json")
    with pytest.raises(UnsupportedFormatError, match="nested"):
        backend.save(np.ones(1), "a.npy", metadata={"deep": deep})
    assert not backend.exists("deep.json") and not backend.exists("a.npy")


# -- directories are not files, whatever their name --------------------------------

DIRECTORY_NAMES = ["d", "d.npy", "d.npz", "d.json", "d.txt", "d.unknown-ext"]


@pytest.mark.parametrize("name", DIRECTORY_NAMES)
def test_loading_a_directory(backend: StorageBackend, name: str) -> None:
    backend.ensure_directory("top/" + name)
    backend.save(np.ones(2), f"top/{name}/inside.npy")
    with pytest.raises(IsADirectoryError) as info:
        backend.load("top/" + name)
    assert info.value.filename == "top/" + name
    with pytest.raises(IsADirectoryError):
        backend.load_batch(["top/" + name])


@pytest.mark.parametrize("name", DIRECTORY_NAMES)
@pytest.mark.parametrize("op", ["copy", "move"])
def test_copying_a_directory(backend: StorageBackend, name: str, op: str) -> None:
    backend.save(np.ones(2), f"top/{name}/inside.npy")
    call = backend.copy if op == "copy" else backend.move
    for dst in ("out.npy", "out.json", "out-" + name):
        with pytest.raises(IsADirectoryError):
            call("top/" + name, dst)
        assert not backend.exists(dst)
    assert backend.is_file(f"top/{name}/inside.npy")


@pytest.mark.parametrize("name", ["d", "d.npy", "d.unknown-ext"])
@pytest.mark.parametrize("src_backend", BACKENDS)
def test_copying_a_directory_between_backends(
    manager: FileManager, src_backend: str, name: str
) -> None:
    manager.save(np.ones(2), f"top/{name}/inside.npy", backend=src_backend)
    for dst_backend in BACKENDS:
        if dst_backend == src_backend:
            continue
        for op in (manager.copy, manager.move):
            with pytest.raises(IsADirectoryError):
                op("top/" + name, "out.npy", src_backend, dst_backend=dst_backend)
            assert not manager.exists("out.npy", backend=dst_backend)
    assert manager.is_file(f"top/{name}/inside.npy", backend=src_backend)
