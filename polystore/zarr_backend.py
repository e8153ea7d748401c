"""The zarr backend: numpy arrays in a zarr hierarchy, saved whole or region by region.

Mapping
-------
Directories are zarr groups and files are zarr arrays; an array may have any
name (``"A/1.npy"``, ``"A/1"``). Only arrays are stored: other values are
refused with :class:`~polystore.UnsupportedFormatError`.

Which hierarchy a path belongs to depends on ``root``:

* ``ZarrBackend(root=...)``: ``root`` (a local directory or an fsspec URL) is
  one hierarchy and paths are relative to it. ``"plate.zarr/A/1.npy"`` is the
  array ``A/1.npy`` of the group ``plate.zarr`` inside it. Absolute paths must
  lie inside ``root``, and ``..`` cannot climb out of it
  (:class:`~polystore.SandboxError`); symbolic links are not resolved.
* ``ZarrBackend()`` (what a default registry builds): every path must pass
  through a directory whose name ends in ``.zarr``; the first such directory
  is the hierarchy and the rest of the path names a node inside it. So
  ``"/data/plate.zarr/A/1.npy"`` is the array ``A/1.npy`` of the store
  ``/data/plate.zarr``, which is a directory (group) itself. A path without a
  ``.zarr`` component is refused with ``ValueError``.

Each local hierarchy keeps a private directory ``.polystore-zarr`` at its top
(temporary arrays and lock files). It never appears in listings, but zarr's
own member listing of the top group warns that it is not a zarr node.

Replacing an array
------------------
On a local file system an array is saved into a temporary directory inside the
hierarchy and renamed into place; an existing array is swapped out in the same
atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; where the file system lacks
it, e.g. NFS, the old array is renamed aside first and the path is missing for
a moment). :meth:`ZarrBackend.load` notices when the array it is reading is
replaced under it and reads again, so it returns the old or the new array,
never a mix. A lazy load (``lazy=True``) gets no such guarantee. On fsspec
storage an overwrite deletes the old array and then writes the new one:
readers may see it missing or incomplete meanwhile.

Region writes
-------------
``save(block, path, region=(slice(...), ...), shape=..., dtype=...)`` writes
``block`` into part of an array, creating the array on first use. Many
processes may write disjoint regions of one array at once. Chunks (shards, for
sharded arrays) that a region covers entirely are written without locks; a
chunk it covers in part is read, changed and written back under an exclusive
per-chunk file lock, so no write is lost. Creating the array and changing its
attributes happen under a per-array lock: racing first writers create it once.
Locks live in ``<hierarchy>/.polystore-zarr/locks`` or in ``lock_dir``, and work
where every writer sees that directory on a file system with ``flock``
semantics (a local disk; NFSv4 across machines). For fsspec URLs there is no
default lock directory: unaligned region writes are refused with
:class:`~polystore.LockRequiredError` unless ``lock_dir`` names a directory
all writers share, and racing creators are not serialised. Overlapping regions
written at once give an undefined mix, as with any file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from ._args import check_seconds
from ._zarr_regions import ChunkLocks, as_shape, check_layout, write_region
from ._zarr_tree import Hierarchy, LocalTree, Locator, canonical, publish
from .base import Kind, StorageBackend
from .exceptions import (
    LockRequiredError,
    MetadataNotFoundError,
    MissingDependencyError,
    UnsupportedFormatError,
    os_error,
)
from .formats import normalize_metadata
from .paths import PathArg, as_str

__all__ = ["ZarrBackend"]

#: ``save`` keywords passed to :func:`zarr.create_array` when an array is created
_CREATE_OPTIONS = frozenset(
    {
        "chunks",
        "shards",
        "compressors",
        "filters",
        "serializer",
        "fill_value",
        "order",
        "dimension_names",
        "chunk_key_encoding",
        "config",
    }
)
#: how long ``load`` keeps reading again while the array is being replaced under
#: it (seconds), and its first and longest pause between two tries
_READ_PATIENCE = 10.0
_READ_PAUSE = (0.001, 0.05)


def _zarr() -> ModuleType:
    """Import zarr (version 3 or later), or explain how to install it."""
    try:
        import zarr
    except ImportError as exc:
        raise MissingDependencyError("zarr>=3", "zarr") from exc
    if int(zarr.__version__.split(".")[0]) < 3:
        raise MissingDependencyError(f"zarr>=3 (found {zarr.__version__})", "zarr")
    return zarr


def _ancestors(key: str) -> list[str]:
    """``""`` (the top) and every ancestor of ``key``, outermost first."""
    parts = key.split("/")[:-1] if key else []
    return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _as_array(data: Any, path: str) -> np.ndarray[Any, Any]:
    if data is None or isinstance(data, (str, bytes, bytearray, memoryview, Mapping)):
        raise UnsupportedFormatError(
            path, reason=f"the zarr backend stores arrays only, got {type(data).__name__}"
        )
    array = np.asarray(data)
    if array.dtype.hasobject:
        raise UnsupportedFormatError(
            path,
            reason="object arrays hold Python objects that only pickle can store, "
            "and zarr stores no pickles",
        )
    return array


class ZarrBackend(StorageBackend):
    """Arrays in zarr hierarchies (zarr-python 3), with safe concurrent region writes.

    Args:
        root: the directory or fsspec URL of the one hierarchy that paths are
            relative to; ``None`` makes every path name its own ``*.zarr``
            store (see the module documentation).
        zarr_format: 3 (default) or 2, for arrays and groups this backend creates.
        lock_dir: where region-write locks live, instead of each local
            hierarchy's ``.polystore-zarr/locks``; required for unaligned region
            writes to fsspec URLs. Every writer must use the same directory.
        lock_timeout: seconds to wait for a lock before
            :class:`~polystore.LockTimeoutError`.
        storage_options: passed to fsspec for URL paths.

    Whole-array ``save`` takes zarr's creation options (``chunks``,
    ``shards``, ``compressors``, ``filters``, ``serializer``, ``fill_value``,
    ``order``, ``dimension_names``, ``chunk_key_encoding``, ``config``) and
    ``metadata``, stored as the array's attributes. ``load`` returns a numpy
    array, or the ``zarr.Array`` with ``lazy=True``. Region writes take
    ``region=``, and ``shape=``/``dtype=`` to create the array on first use.
    zarr is imported on first use; without it every call raises
    :class:`~polystore.exceptions.MissingDependencyError`.

    Example: each worker writes its tile; the first one creates the array::

        backend = ZarrBackend("out")
        backend.save(tile, "plate.zarr/A/1", region=(slice(0, 512), slice(512, 1024)),
                     shape=(2048, 2048), dtype="uint16", chunks=(256, 256))
        image = backend.load("plate.zarr/A/1")
    """

    name = "zarr"
    save_options: frozenset[str] | None = _CREATE_OPTIONS | {"region", "shape", "dtype"}
    load_options: frozenset[str] | None = frozenset({"lazy"})
    arrays_under_any_name = True

    @property
    def extensions(self) -> frozenset[str]:
        # arrays only: under any name, and so under the array extension too
        return frozenset({".npy"})

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        zarr_format: int = 3,
        lock_dir: str | os.PathLike[str] | None = None,
        lock_timeout: float = 60.0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        self._root = None if root is None else canonical(as_str(root, "root"))
        self._lock_dir = None if lock_dir is None else os.path.abspath(as_str(lock_dir, "lock_dir"))
        self._lock_timeout = check_seconds(lock_timeout, "lock_timeout")
        self._zarr_format = zarr_format
        self._storage_options = dict(storage_options or {})
        self._locator = Locator(self._root, zarr_format, self._storage_options)
        self._zarr_checked = False

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from configuration: stores and caches are per process
        rebuild = functools.partial(
            type(self),
            self._root,
            zarr_format=self._zarr_format,
            lock_dir=self._lock_dir,
            lock_timeout=self._lock_timeout,
            storage_options=self._storage_options,
        )
        return (rebuild, ())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self._root!r}, zarr_format={self._zarr_format})"

    @property
    def root(self) -> str | None:
        """The hierarchy's directory or URL, or ``None`` (one store per ``*.zarr`` path)."""
        return self._root

    # -- where a path lives ------------------------------------------------------
    def _locate(self, path: PathArg) -> tuple[Hierarchy, str, str]:
        """The hierarchy of ``path``, the node's key inside it, and ``path`` as text."""
        text = as_str(path)
        if not self._zarr_checked:
            _zarr()  # the missing extra is reported on first use, whatever the call
            self._zarr_checked = True
        hierarchy, key = self._locator.locate(text)
        return hierarchy, key, text

    def _locks(self, hierarchy: Hierarchy, key: str) -> ChunkLocks | None:
        if self._lock_dir is not None:
            base = self._lock_dir
        elif hierarchy.tree.local:
            base = hierarchy.private_dir("locks")
        else:
            return None
        return ChunkLocks.for_array(base, hierarchy.root, key, self._lock_timeout)

    # -- primitives ------------------------------------------------------------
    def kind(self, path: PathArg) -> Kind | None:
        hierarchy, key, _ = self._locate(path)
        return hierarchy.kind(key)

    def list_dir(self, path: PathArg) -> list[str]:
        hierarchy, key, text = self._locate(path)
        kind = hierarchy.kind(key)
        if kind is None:
            raise os_error(FileNotFoundError, text)
        if kind == "file":
            raise os_error(NotADirectoryError, text)
        return hierarchy.children(key)

    def ensure_directory(self, path: PathArg) -> str:
        hierarchy, key, text = self._locate(path)
        kind = hierarchy.kind(key)
        if kind == "file":
            raise os_error(FileExistsError, text)
        if kind == "dir" and hierarchy.has_metadata(key):
            return text
        self._ensure_parents(hierarchy, key, text)
        self._create_group(hierarchy, key, text)
        return text

    def delete(self, path: PathArg, recursive: bool = False) -> None:
        hierarchy, key, text = self._locate(path)
        kind = hierarchy.kind(key)
        if kind is None:
            raise os_error(FileNotFoundError, text)
        if kind == "dir" and not recursive and hierarchy.children(key):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), text)
        tree = hierarchy.tree
        if not key:
            if hierarchy.implicit_root:
                raise OSError(errno.EBUSY, "the root of a ZarrBackend cannot be deleted", text)
            tree.remove("")
        elif isinstance(tree, LocalTree):
            aside = hierarchy.temporary_path()
            try:
                os.rename(tree.path(key), aside)  # the node disappears in one step
            except FileNotFoundError:
                raise os_error(FileNotFoundError, text) from None
            shutil.rmtree(aside)
        else:
            tree.remove(key)

    def load(self, path: PathArg, **kwargs: Any) -> Any:
        """Return the array at ``path`` as numpy, or as a ``zarr.Array`` with ``lazy=True``.

        Raises:
            FileNotFoundError: no array is at ``path``.
            IsADirectoryError: ``path`` is a group.
        """
        hierarchy, key, text = self._locate(path)
        self._check_options(kwargs, frozenset(), "load", text)
        lazy = bool(kwargs.pop("lazy", False))
        kwargs.pop("allow_pickle", None)  # zarr stores no pickles, so there is nothing to allow
        kind = hierarchy.kind(key)
        if kind is None:
            raise os_error(FileNotFoundError, text)
        if kind == "dir":
            raise os_error(IsADirectoryError, text)
        if lazy:
            return self._open(hierarchy, key, "r")
        if not hierarchy.tree.local:
            return np.asarray(self._open(hierarchy, key, "r")[...])
        # Tries while a writer keeps replacing the array, pausing a little
        # longer each time so that a busy machine still lets one read through.
        deadline = time.monotonic() + _READ_PATIENCE
        pause, longest = _READ_PAUSE
        tries = 0
        while tries == 0 or time.monotonic() < deadline:
            if tries:
                time.sleep(pause)
                pause = min(2 * pause, longest)
            tries += 1
            before = hierarchy.version(key)
            if before is None:
                raise os_error(FileNotFoundError, text)
            try:
                value = np.asarray(self._open(hierarchy, key, "r")[...])
            except Exception:
                # chunks of a new array decoded with the old metadata fail in
                # many ways; they are only errors if nothing was replaced
                if hierarchy.version(key) == before:
                    raise
                continue
            if hierarchy.version(key) == before:
                return value
        raise BlockingIOError(
            errno.EAGAIN,
            f"the array was replaced {tries} times in {_READ_PATIENCE:g} s while being read",
            text,
        )

    def load_metadata(self, path: PathArg) -> dict[str, Any]:
        hierarchy, key, text = self._locate(path)
        if hierarchy.kind(key) != "file":
            raise MetadataNotFoundError(text)
        attributes = hierarchy.attributes(key)
        if not attributes:
            raise MetadataNotFoundError(text)
        return attributes

    def save(
        self,
        data: Any,
        path: PathArg,
        *,
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save an array, or write a region of one (``region=``).

        Raises:
            LockRequiredError: an unaligned region write, or an attribute
                change, where no lock directory is available.
            ValueError: the region does not fit the array, or the existing
                array's shape, dtype or chunks differ from those asked for.
        """
        self._check_options(kwargs, frozenset(), "save", as_str(path))
        region = kwargs.pop("region", None)
        shape = kwargs.pop("shape", None)
        dtype = kwargs.pop("dtype", None)
        kwargs.pop("allow_pickle", None)  # zarr stores no pickles, so there is nothing to allow
        hierarchy, key, text = self._locate(path)
        attributes = normalize_metadata(metadata, "metadata")
        array = _as_array(data, text)
        if region is None:
            if shape is not None or dtype is not None:
                raise TypeError("shape= and dtype= describe the array that a region= write creates")
            self._save_whole(hierarchy, key, text, array, overwrite, attributes, kwargs)
            return
        if not overwrite:
            raise ValueError(
                "a region write changes an array in place; overwrite=False does not apply"
            )
        target = self._region_target(hierarchy, key, text, array, shape, dtype, attributes, kwargs)
        write_region(target, array, region, self._locks(hierarchy, key), text)

    # -- helpers ------------------------------------------------------------------
    def _open(self, hierarchy: Hierarchy, key: str, mode: str) -> Any:
        # an existing array is opened in whichever format it was written in
        return _zarr().open_array(hierarchy.store(), path=key, mode=mode)

    def _ensure_parents(self, hierarchy: Hierarchy, key: str, text: str) -> None:
        """Create the groups above ``key`` that are missing, top group included."""
        if not key:
            return  # the node is the top of its store: nothing is above it
        parents = _ancestors(key)
        for parent in parents:
            kind = hierarchy.kind(parent)
            if kind == "file":
                raise os_error(NotADirectoryError, text)
            # the top of a backend's root is a directory before it has metadata
            missing = kind is None or (not parent and not hierarchy.has_metadata(""))
            if missing:
                # one call creates this group and every group below it
                self._create_group(hierarchy, parents[-1], text)
                return

    def _create_group(self, hierarchy: Hierarchy, key: str, text: str) -> None:
        """Create the group ``key`` and the groups above it (a no-op where they exist)."""
        zarr = _zarr()
        from zarr.errors import ContainsArrayError, ContainsGroupError

        try:
            zarr.create_group(hierarchy.store(), path=key, zarr_format=self._zarr_format)
        except ContainsGroupError:
            pass  # made meanwhile by another writer: what we wanted
        except ContainsArrayError:
            raise os_error(NotADirectoryError, text) from None

    def _save_whole(
        self,
        hierarchy: Hierarchy,
        key: str,
        text: str,
        array: np.ndarray[Any, Any],
        overwrite: bool,
        attributes: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> None:
        zarr = _zarr()
        from zarr.errors import ContainsArrayError, ContainsGroupError

        kind = hierarchy.kind(key)
        if kind == "dir":
            raise os_error(IsADirectoryError, text)
        if kind == "file" and not overwrite:
            raise os_error(FileExistsError, text)
        self._ensure_parents(hierarchy, key, text)
        options = dict(options, zarr_format=self._zarr_format, attributes=attributes)
        tree = hierarchy.tree
        if not (key and isinstance(tree, LocalTree)):
            try:
                zarr.create_array(
                    hierarchy.store(), name=key, data=array, overwrite=overwrite, **options
                )
            except ContainsArrayError:
                raise os_error(FileExistsError, text) from None
            except ContainsGroupError:
                raise os_error(IsADirectoryError, text) from None
            return
        from ._zarr_staging import StagingStore

        staging = hierarchy.temporary_path()
        store = StagingStore(staging)
        try:
            zarr.create_array(store, data=array, **options)
            replaced = publish(staging, tree.path(key), overwrite)
        except FileExistsError:
            shutil.rmtree(staging, ignore_errors=True)
            raise os_error(FileExistsError, text) from None
        except BaseException:
            # zarr raises at the first failed chunk while others are still being
            # written: stop them all before removing what they wrote
            store.quiesce()
            shutil.rmtree(staging, ignore_errors=True)  # the first error is the one to report
            raise
        if replaced is not None:
            shutil.rmtree(replaced)

    def _region_target(
        self,
        hierarchy: Hierarchy,
        key: str,
        text: str,
        block: np.ndarray[Any, Any],
        shape: Any,
        dtype: Any,
        attributes: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> Any:
        """Open (creating it if needed) the array a region write goes to, and check it."""
        kind = hierarchy.kind(key)
        if kind == "dir":
            raise os_error(IsADirectoryError, text)
        if kind is None:
            if shape is None:
                raise os_error(
                    FileNotFoundError,
                    text,
                    "no array to write a region of; pass shape= (and dtype=) to create it",
                )
            wanted = np.dtype(block.dtype if dtype is None else dtype)
            self._create_once(hierarchy, key, text, as_shape(shape), wanted, attributes, options)
        target = self._open(hierarchy, key, "r+")
        check_layout(target, text, shape, dtype, options)
        if attributes and any(target.attrs.get(k) != v for k, v in attributes.items()):
            self._update_attributes(hierarchy, key, text, attributes)
        return target

    def _create_once(
        self,
        hierarchy: Hierarchy,
        key: str,
        text: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        attributes: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> None:
        zarr = _zarr()
        from zarr.errors import ContainsArrayError, ContainsGroupError

        locks = self._locks(hierarchy, key)
        with locks.hold(["create"]) if locks else contextlib.nullcontext():
            # checked again under the lock: a racing writer may have created it
            if hierarchy.kind(key) is not None:
                return
            self._ensure_parents(hierarchy, key, text)
            try:
                zarr.create_array(
                    hierarchy.store(),
                    name=key,
                    shape=shape,
                    dtype=dtype,
                    attributes=attributes,
                    zarr_format=self._zarr_format,
                    **options,
                )
            except ContainsArrayError:
                pass  # no lock (fsspec storage): another writer created it first
            except ContainsGroupError:
                raise os_error(IsADirectoryError, text) from None  # a group made meanwhile

    def _update_attributes(
        self, hierarchy: Hierarchy, key: str, text: str, attributes: dict[str, Any]
    ) -> None:
        locks = self._locks(hierarchy, key)
        if locks is None:
            raise LockRequiredError(
                text,
                "changing an existing array's attributes rewrites its metadata, which "
                "concurrent writers could lose; pass lock_dir= a directory all writers share",
            )
        with locks.hold(["create"]):
            self._open(hierarchy, key, "r+").update_attributes(attributes)
