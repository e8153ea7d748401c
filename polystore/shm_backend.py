"""The ``shm`` backend: a file tree kept entirely in a :class:`~polystore.SharedArrayStore`.

Arrays are stored as arrays (one copy in, zero-copy read-only views out);
directories, JSON, text, raw bytes and ``.npz`` archives are stored as small
tagged byte strings next to them in the same store. The tree's layout is the
one :class:`~polystore.MemoryBackend` uses, so both backends share one
implementation of the semantics; only the mapping underneath differs.

Shared memory belongs to one machine. The backend records the node it was
made on; unpickled on another node (a Dask worker elsewhere, say), it becomes
a stand-in whose every call raises :class:`~polystore.NotShareableError`
instead of quietly writing to that machine's memory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Literal

import numpy as np

from ._shm.keys import key_parts
from ._shm.write import Related
from .base import StorageBackend, UnavailableBackend
from .exceptions import UnsupportedFormatError, os_error
from .formats import ArraySpec, FormatRegistry, NpyFormat, array_spec, normalize_metadata
from .memory import _META, Link, MemoryBackend
from .paths import PathArg, as_str, virtual, virtual_parents
from .shmstore import SharedArrayStore

__all__ = ["SharedMemoryBackend", "node_id"]

#: environment variable that overrides :func:`node_id`
NODE_ENV = "POLYSTORE_NODE_ID"


def node_id() -> str:
    """Identity of this machine (boot): host name and kernel boot id.

    Processes that share ``/dev/shm`` share it. Set ``POLYSTORE_NODE_ID`` to
    override it, for example in containers that mount one ``/dev/shm``.
    """
    override = os.environ.get(NODE_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


# One-byte tags of the values kept as bytes; arrays are stored natively.
_DIR, _TEXT, _BYTES, _JSON, _NPZ, _LINK = b"D", b"S", b"B", b"J", b"Z", b"L"


def _encode(value: Any) -> bytes:
    if value is None:  # a directory: an empty value, which needs no block (see _ancestors)
        return b""
    if isinstance(value, Link):  # before str and JSON: a link is a tuple of a str
        return _LINK + value.target.encode("utf-8", "surrogatepass")
    if isinstance(value, str):
        return _TEXT + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return _BYTES + value
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **value)
        return _NPZ + buf.getvalue()
    return _JSON + json.dumps(value).encode("utf-8")


def _decode(blob: bytes) -> Any:
    tag, body = blob[:1], blob[1:]
    if tag in (b"", _DIR):  # (_DIR: how directories were written before)
        return None
    if tag == _TEXT:
        return body.decode("utf-8", "surrogatepass")
    if tag == _BYTES:
        return body
    if tag == _LINK:
        return Link(body.decode("utf-8", "surrogatepass"))
    if tag == _NPZ:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    return json.loads(body.decode("utf-8"))


def _storable(key: str, value: Any) -> Any:
    """What the store keeps for ``value``: an array as it is, anything else encoded."""
    if not isinstance(value, np.ndarray):
        return _encode(value)
    if value.dtype.hasobject:
        raise UnsupportedFormatError(
            key,
            reason="shared memory holds no Python objects, so object arrays "
            "(which need pickle) cannot be stored in the shm backend",
        )
    return value


class _StoreDict(MutableMapping[str, Any]):
    """The mapping interface :class:`MemoryBackend` needs, over a shared array store.

    ``pop`` deletes without reading the value back (the backend only needs to
    know that the key is gone), and returns ``None`` for a present key.
    """

    #: storing copies the value into shared memory (MemoryBackend need not copy first)
    copies_on_store = True

    def __init__(self, store: SharedArrayStore) -> None:
        self.store = store

    def __getitem__(self, key: str) -> Any:
        value = self.store.get_value(key)
        return _decode(value) if isinstance(value, bytes) else value

    def __setitem__(self, key: str, value: Any) -> None:
        stored = _storable(key, value)
        if isinstance(stored, np.ndarray):
            self.store.put(key, stored)
        else:
            self.store.put_bytes(key, stored)

    def staged(self, updates: Mapping[str, Any]) -> dict[str, Any]:
        """What the store keeps for each of ``updates``: arrays as they are, the rest encoded."""
        return {key: _storable(key, value) for key, value in updates.items()}

    def __delitem__(self, key: str) -> None:
        self.store.delete(key)

    def pop(self, key: str, default: Any = None) -> Any:
        if key not in self.store:  # no locked section for what is not there (lock-free)
            return default
        try:
            self.store.delete(key)
        except KeyError:
            return default
        return None

    def __contains__(self, key: object) -> bool:
        return key in self.store

    def keys(self) -> Any:
        return self.store.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.keys())

    def __len__(self) -> int:
        return len(self.store)


def _ancestry(vpath: str) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(directory markers to ensure, (file key, name) in the way) of the file ``vpath``.

    Every save and create_array of a file needs them; they are cached by
    directory, which the files of a pipeline share. The lists are only read.
    """
    return _ancestry_of(virtual_parents(vpath))


@functools.lru_cache(maxsize=4096)
def _ancestry_of(parents: tuple[str, ...]) -> tuple[list[Any], list[tuple[Any, str]]]:
    return [key_parts(p + "/") for p in parents], [(key_parts(p), p) for p in parents]


class SharedMemoryBackend(MemoryBackend):
    """A file tree in shared memory, visible to every process on this machine.

    Args:
        store: the store to use: ``None`` creates one that this backend owns
            (and removes at :meth:`close`); a :class:`~polystore.SharedArrayStore`
            or a store name uses an existing one, which stays open.
        max_bytes: cap on the shared memory of a store created here.
        spill_dir: where a store created here puts values that do not fit
            in shared memory (see :class:`~polystore.SharedArrayStore`).
        formats: accepted formats, as for :class:`~polystore.MemoryBackend`.

    The backend pickles to the name of its store, so a registry holding it can
    be sent to spawned workers, which then see the same files. Arrays load as
    read-only views of shared memory. A file changes with its metadata and
    its new directories in one step of the store: whatever a writer is
    killed at, the path holds the old file and metadata or the new ones.
    """

    name = "shm"

    def __init__(
        self,
        store: SharedArrayStore | str | None = None,
        *,
        max_bytes: int | None = None,
        formats: FormatRegistry | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        # _closes_store: close() closes the handle made here (a new store,
        # which closing removes, or one attached by name, which closing
        # lets go of); a store passed in is its caller's to close.
        if store is None:
            self._shm = SharedArrayStore(max_bytes=max_bytes, spill_dir=spill_dir)
            self._closes_store = True
        elif isinstance(store, str):
            self._shm, self._closes_store = SharedArrayStore.attach(store), True
        elif isinstance(store, SharedArrayStore):
            self._shm, self._closes_store = store, False
        else:
            raise TypeError(
                "store must be a SharedArrayStore, a store name or None, "
                f"got {type(store).__name__}"
            )
        super().__init__(shared_dict=_StoreDict(self._shm), formats=formats, store=None)
        self._node = node_id()

    def _in_place_store(self, nbytes: int) -> SharedArrayStore | None:
        return self._shm

    # A file, its metadata and its directories change in one step of the
    # store (SharedArrayStore._commit, or the create block's publish): a
    # process killed at any point leaves the old file with its old metadata
    # or the new file with the new, as the disk backend commits a file with
    # its sidecar. Without metadata, the old metadata goes in the same step.
    # The directories above the file are made in that step where missing,
    # and a file in the place of one refuses it, so that a directory removed
    # or a file saved meanwhile by another process cannot leave a file
    # outside the tree.

    _dirs_in_commit = True

    def _related(self, vpath: str, meta: dict[str, Any] | None, values: dict[str, Any]) -> Any:
        """The store's keys that change with the file ``vpath`` (see above)."""
        assert isinstance(self._data, _StoreDict)
        remove = []
        if meta is None:
            remove.append(_META + vpath)
        else:
            values = {**values, _META + vpath: meta}
        ensure, conflicts = _ancestry(vpath)
        return self._shm._related(self._data.staged(values), remove, ensure, conflicts)

    def _in_the_way(self, exc: FileExistsError, text: str, vpath: str) -> OSError:
        """The backend's error for a store key found in the way of the file ``vpath``."""
        if exc.filename in virtual_parents(vpath):
            return os_error(NotADirectoryError, text, f"{exc.filename!r} is a file")
        return os_error(FileExistsError, text)

    def _commit_file(
        self,
        vpath: str,
        updates: dict[str, Any],
        meta: dict[str, Any] | None,
        old: Any,
        new: Any,
        timeout: float | None,
    ) -> None:
        values = {k: v for k, v in updates.items() if not k.endswith("/")}  # (made below)
        try:
            self._shm._commit(self._related(vpath, meta, values), timeout, vpath)
        except FileExistsError as exc:
            raise self._in_the_way(exc, vpath, vpath) from None

    def _made_in(
        self,
        store: SharedArrayStore,
        vpath: str,
        spec: ArraySpec,
        overwrite: bool,
        timeout: float | None,
        meta: dict[str, Any] | None,
    ) -> tuple[contextlib.AbstractContextManager[Any], bool]:
        def extra() -> Related:
            if meta is None:  # (the common case, without _related's checks of values)
                ensure, conflicts = _ancestry(vpath)
                return Related([], [key_parts(_META + vpath)], ensure, conflicts)
            return self._related(vpath, meta, {})

        def translate(found: FileExistsError) -> BaseException:
            return self._in_the_way(found, vpath, vpath)

        return store._create(vpath, spec, overwrite, timeout, extra, translate), True

    def create_array(
        self,
        path: PathArg,
        shape: int | Sequence[int],
        dtype: Any = float,
        *,
        order: Literal["C", "F"] = "C",
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> contextlib.AbstractContextManager[Any]:
        # MemoryBackend's, without its generator: every file is made in
        # place here, and the store's block is the context manager itself.
        # It runs with the caches cold after the last array a pipeline wrote
        # (the create_array rows of benchmarks/pipeline_breakdown.py).
        text = as_str(path)
        spec = array_spec(shape, dtype, order)
        vpath = virtual(text)
        self._check_new_file(text, overwrite, vpath)
        fmt = self.formats.for_path(text)
        if (kwargs and set(kwargs) != {"timeout"}) or type(fmt) is not NpyFormat:
            return super().create_array(
                text, shape, dtype, order=order, overwrite=overwrite, metadata=metadata, **kwargs
            )
        meta = None if metadata is None else normalize_metadata(metadata, text)
        timeout = kwargs.get("timeout", 0)
        return self._made_in(self._shm, vpath, spec, overwrite, timeout, meta)[0]

    def load(self, path: PathArg, **kwargs: Any) -> Any:
        # An .npy file's array straight from the store: its read-only view
        # is the value, which MemoryBackend.load's checks would pass as it is
        # (the load row of benchmarks/pipeline_breakdown.py). Anything else,
        # and every error, takes the general way.
        if not kwargs:
            text = as_str(path)
            try:
                fmt = self.formats.for_path(text)
            except UnsupportedFormatError:
                fmt = None
            if type(fmt) is NpyFormat:
                try:
                    value = self._shm.get_value(virtual(text))
                except KeyError:
                    value = None
                if type(value) is np.ndarray:
                    return value
        return super().load(path, **kwargs)

    def delete(self, path: PathArg, recursive: bool = False) -> None:
        # A file is found and removed in one section, with no lookup before
        # (the delete row of benchmarks/pipeline_breakdown.py). Anything
        # else (a directory, nothing) takes the general way.
        text = as_str(path)
        vpath = virtual(text)
        if not self._shm._remove_with(vpath, _META + vpath):
            super().delete(text, recursive)

    def _remove_file(self, vpath: str) -> None:
        # Invariant kept: a file and its metadata go in one step (a kill
        # leaves both or neither).
        self._shm._remove_with(vpath, _META + vpath)

    def _remove_dir(self, prefix: str, text: str) -> None:
        # Only if nothing is under it, checked in the same step: a file saved
        # there meanwhile would otherwise be left outside the tree.
        self._shm._remove_childless(prefix, text)

    def move(self, src: PathArg, dst: PathArg, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Move the file ``src`` to ``dst`` in one step of the store, without a copy.

        Its metadata goes with it, and directories missing above ``dst`` are
        made in the same step: a process killed at any point leaves the file
        at ``src`` or at ``dst``, never at both or neither. A link, a format
        conversion (``dst`` of another format) or extra keywords take the
        general way: a copy, then a delete.
        """
        s_text, d_text = as_str(src), as_str(dst)
        s, d = virtual(s_text), virtual(d_text)
        if kwargs or s == d or not self._renames(s_text, d_text):
            super().move(src, dst, overwrite=overwrite, **kwargs)
            return
        self._check_new_file(d_text, overwrite)
        self._check_parents(d, create=False)
        ensure, conflicts = _ancestry(d)
        if not overwrite:
            conflicts = [*conflicts, (key_parts(d), d)]
        moves = [(s, d, True), (_META + s, _META + d, False)]  # no metadata: none at dst either
        try:
            self._shm._move(moves, self._shm._related(None, (), ensure, conflicts))
        except KeyError:  # removed meanwhile
            raise self._missing(s_text, s) from None
        except FileExistsError as exc:  # saved meanwhile
            raise self._in_the_way(exc, d_text, d) from None

    def _renames(self, s_text: str, d_text: str) -> bool:
        """Whether moving ``s_text`` to ``d_text`` is a rename of the store's keys."""
        try:
            same_format = type(self.formats.for_path(s_text)) is type(self.formats.for_path(d_text))
        except UnsupportedFormatError:
            return False
        s = virtual(s_text)
        return same_format and s in self._data and not isinstance(self._data.get(s), Link)

    @staticmethod
    def _stored_as(store: SharedArrayStore, vpath: str) -> Any:
        return None  # the store's key is the file itself

    @property
    def array_store(self) -> SharedArrayStore:
        """The shared array store that holds this backend's files."""
        return self._shm

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._node, self._shm.name, self.formats, self._shm.directory))

    def close(self) -> None:
        """Close the store if this backend opened it: remove it if created here, else let go.

        A store passed to the constructor is left to its caller.
        """
        if self._closes_store:
            self._shm.close()

    def __repr__(self) -> str:
        return f"SharedMemoryBackend({self._shm.name!r})"


def _rebuild(
    node: str, name: str, formats: FormatRegistry, directory: str | None = None
) -> StorageBackend:
    here = node_id()
    if node != here:
        return UnavailableBackend(
            "shm",
            f"the shm backend keeps its files in the shared memory of node {node!r}, but this "
            f"process runs on {here!r}; use a backend every machine reaches (disk, zarr) there",
        )
    backend = SharedMemoryBackend.__new__(SharedMemoryBackend)
    backend._shm = SharedArrayStore.attach(name, directory=directory)
    backend._closes_store = True
    MemoryBackend.__init__(
        backend, shared_dict=_StoreDict(backend._shm), formats=formats, store=None
    )
    backend._node = node
    return backend
