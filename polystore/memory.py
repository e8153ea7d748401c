"""In-memory backend, local or shared between processes.

Layout of the mapping (a plain ``dict`` or a ``multiprocessing.Manager().dict()``):

* ``"/a/b.npy"`` -> the stored value (already normalised by its format), or a
  :class:`ShmRef` when the array lives in a shared-memory store;
* ``"/a/"`` -> ``None``: the directory ``/a`` (a trailing slash marks directories);
* ``"#meta:/a/b.npy"`` -> the metadata dict saved with ``/a/b.npy``;
* ``"/a/c.npy"`` -> ``Link("/a/b.npy")``: a symbolic link, followed when read.
  A link sits where a file would, so it is listed, replaced by a save and
  removed by a delete like one; finding it needs no extra lookup, but neither
  does it check its target, so a link whose file is gone still ``exists()``
  (reading or ``stat()`` raises ``FileNotFoundError``).

Directory structure and payloads live under different keys, so ``exists``,
``list_dir`` and ``list_files`` only ever move keys across a process boundary,
never the stored arrays.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import posixpath
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from ._managed import resyncing
from .base import Kind, StatResult, StorageBackend, _normalize_extensions, check_link_names
from .exceptions import (
    MetadataNotFoundError,
    NotShareableError,
    SandboxError,
    UnsupportedFormatError,
    os_error,
)
from .formats import (
    ArraySpec,
    FormatRegistry,
    NpyFormat,
    array_spec,
    default_formats,
    normalize_metadata,
)
from .paths import PathArg, as_str, join_listing, virtual, virtual_parents

if TYPE_CHECKING:
    from .shmstore import SharedArrayStore

__all__ = ["Link", "MemoryBackend", "ShmRef"]

_META = "#meta:"
#: how often a recursive delete lists a directory again when files keep appearing in it
_MAX_RETRIES = 100
#: arrays at least this large go through a shared-memory store when one is attached
DEFAULT_SHM_THRESHOLD = 64 * 1024


class ShmRef(NamedTuple):
    """Descriptor of an array held in a :class:`~polystore.SharedArrayStore`."""

    store: str
    key: str


class Link(NamedTuple):
    """A symbolic link in the tree: the value of its key is the path it points to."""

    target: str


#: links followed in a row before giving up, as POSIX does with ELOOP
_MAX_HOPS = 40


def _is_local(mapping: MutableMapping[str, Any]) -> bool:
    return isinstance(mapping, dict)


def _private_copy(value: Any) -> Any:
    """A copy of the arrays in a normalised value (other kinds are fresh already)."""
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True, order="C")
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        return {k: np.array(v, copy=True, order="C") for k, v in value.items()}
    return value


def _frozen(value: Any) -> Any:
    """A value safe to hand out: arrays read-only, containers copied."""
    if isinstance(value, np.ndarray):
        if value.flags.writeable:
            value = value.view()
            value.flags.writeable = False
        return value
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, (list, dict)):
        return copy.deepcopy(value)
    return value


class MemoryBackend(StorageBackend):
    """Stores normalised values in a mapping under a virtual POSIX tree.

    Args:
        shared_dict: the mapping to use. ``None`` makes a private ``dict``; a
            ``multiprocessing.Manager().dict()`` shares the files with every
            process that receives this backend (or the same proxy).
        formats: the formats to accept; defaults to :func:`~polystore.formats.default_formats`.
        store: where large arrays go when the mapping is shared. ``"auto"``
            (the default) creates a :class:`~polystore.SharedArrayStore` owned by
            this process when ``shared_dict`` is not a plain ``dict``; ``None``
            sends every value through the mapping itself.
        shm_threshold: arrays of at least this many bytes use the store.

    Arrays load as read-only arrays, without a copy where the storage allows
    it; call ``.copy()`` for a writable one. A backend over a plain ``dict``
    belongs to one process: pickling it raises :class:`NotShareableError`
    instead of handing a worker an empty copy.
    """

    name = "memory"
    save_options: frozenset[str] | None = frozenset({"timeout"})
    load_options: frozenset[str] | None = frozenset()

    def __init__(
        self,
        shared_dict: MutableMapping[str, Any] | None = None,
        *,
        formats: FormatRegistry | None = None,
        store: SharedArrayStore | str | None = "auto",
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
    ) -> None:
        needed = ("keys", "__getitem__", "__setitem__", "__contains__")
        if shared_dict is not None and not all(hasattr(shared_dict, m) for m in needed):
            raise TypeError(
                f"shared_dict must be a mutable mapping, got {type(shared_dict).__name__}"
            )
        self._data: MutableMapping[str, Any] = {} if shared_dict is None else shared_dict
        # Whether storing a value in the mapping already copies it (a Manager
        # proxy pickles it, a shared-memory mapping says so); otherwise save()
        # copies arrays first.
        self._mapping_copies = hasattr(self._data, "_callmethod") or bool(
            getattr(self._data, "copies_on_store", False)
        )
        self._data = resyncing(self._data)  # (a Ctrl-C mid-call leaves a proxy out of step)
        self.formats = formats if formats is not None else default_formats()
        self.shm_threshold = int(shm_threshold)
        self._owns_store = False
        if store == "auto":
            store = None
            if not _is_local(self._data):
                from .shmstore import SharedArrayStore

                store = SharedArrayStore()
                self._owns_store = True
        elif store is not None and isinstance(store, str):
            raise ValueError(f"store must be a SharedArrayStore, 'auto' or None, got {store!r}")
        self.store: SharedArrayStore | None = store
        self._attached: dict[str, SharedArrayStore] = {}

    @property
    def shared(self) -> bool:
        """Whether other processes can see this backend's files."""
        return not _is_local(self._data)

    @property
    def shareable(self) -> bool:
        return self.shared

    @property
    def extensions(self) -> frozenset[str]:
        return frozenset(self.formats)

    def __reduce__(self) -> tuple[Any, ...]:
        if not self.shared:
            raise NotShareableError(
                "MemoryBackend over a plain dict lives in one process and cannot be sent "
                "to another; build it with shared_dict=multiprocessing.Manager().dict() "
                "or use polystore.shared_registry()"
            )
        data = getattr(self._data, "proxy", self._data)  # (Resyncing: the proxy itself)
        return (_rebuild, (data, self.formats, self.store, self.shm_threshold))

    # -- helpers ------------------------------------------------------------
    def _kind_of(self, vpath: str) -> Kind | None:
        if vpath == "/":
            return "dir"
        if vpath in self._data:
            return "file"
        if vpath + "/" in self._data:
            return "dir"
        return None

    def _check_new_file(self, path: PathArg, overwrite: bool, vpath: str | None = None) -> None:
        # As the base class's, with one lookup per ancestor: this tree keeps
        # no directory under a file, so "no ancestor is a file" is the test.
        # (_kind_of and _check_parents inlined: the shm backend's create_array
        # runs this with cold caches, benchmarks/pipeline_breakdown.py.)
        # ``vpath``: the path's virtual form, when the caller has it already.
        text = as_str(path)
        if vpath is None:
            vpath = virtual(text)
        has = self._data.__contains__
        if vpath != "/" and has(vpath):  # a file: its ancestors are directories
            if not overwrite:
                raise os_error(FileExistsError, text)
            return
        if vpath == "/" or has(vpath + "/"):
            raise os_error(IsADirectoryError, text)
        for parent in virtual_parents(vpath):
            if has(parent):
                raise os_error(NotADirectoryError, vpath, f"{parent!r} is a file")

    def _check_parents(self, vpath: str, create: bool) -> list[str]:
        """Refuse a file among the ancestors; return the directory keys to create."""
        missing = []
        for parent in virtual_parents(vpath):
            if parent in self._data:
                raise os_error(NotADirectoryError, vpath, f"{parent!r} is a file")
            if create and parent + "/" not in self._data:
                missing.append(parent + "/")
        return missing

    def _drop_payload(self, value: Any) -> None:
        if isinstance(value, ShmRef):
            store = self._store_for(value.store)
            if value.key in store:
                store.delete(value.key)

    def _store_for(self, name: str) -> SharedArrayStore:
        if self.store is not None and self.store.name == name:
            return self.store
        found = self._attached.get(name)
        if found is None:
            from .shmstore import SharedArrayStore

            found = self._attached[name] = SharedArrayStore.attach(name)
        return found

    # -- primitives ---------------------------------------------------------
    def save(
        self,
        data: Any,
        path: PathArg,
        *,
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        text = as_str(path)
        vpath = virtual(text)
        fmt = self.formats.for_path(text)
        if kwargs:
            self._check_options(kwargs, fmt.save_options, "save", text)
        timeout = kwargs.pop("timeout", 0)  # waiting for room in shared memory
        value = fmt.normalize(data, text, copy=False, **kwargs)
        meta = normalize_metadata(metadata, text)
        if vpath == "/" or vpath + "/" in self._data:
            raise os_error(IsADirectoryError, text)
        new_dirs = self._check_parents(vpath, create=not self._dirs_in_commit)
        if not overwrite and vpath in self._data:
            raise os_error(FileExistsError, text)
        # Files never hold None (that marks directories, under other keys).
        old = self._data.get(vpath) if self.store is not None else None
        if (
            self.store is not None
            and isinstance(value, np.ndarray)
            and value.nbytes >= self.shm_threshold
        ):
            self.store.put(vpath, value, timeout=timeout)
            value = ShmRef(self.store.name, vpath)
        elif not self._mapping_copies:
            value = _private_copy(value)
        updates: dict[str, Any] = dict.fromkeys(new_dirs)
        updates[vpath] = value
        self._commit_file(vpath, updates, meta, old, value, timeout)

    def _commit_file(
        self,
        vpath: str,
        updates: dict[str, Any],
        meta: dict[str, Any] | None,
        old: Any,
        new: Any,
        timeout: float | None,
    ) -> None:
        """Write a file's entries (its value and new directories) and metadata to the mapping."""
        self._data.update(updates)
        if meta is not None:
            self._data[_META + vpath] = meta
        else:
            self._data.pop(_META + vpath, None)
        if isinstance(old, ShmRef) and old != new:
            self._drop_payload(old)

    @contextlib.contextmanager
    def _create_block(
        self,
        path: PathArg,
        shape: int | Sequence[int],
        dtype: Any,
        order: Literal["C", "F"],
        overwrite: bool,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> Iterator[Any]:
        # With a shared store (and a value of at least shm_threshold bytes)
        # the array is the stored value itself, made with
        # SharedArrayStore.create; the file appears in the tree once the
        # store has published it. Otherwise as the base class does.
        text = as_str(path)
        vpath = virtual(text)
        spec = array_spec(shape, dtype, order)
        self._check_new_file(path, overwrite)
        store = self._in_place_store(spec.nbytes)
        in_place = not set(kwargs) - {"timeout"}
        if store is None or type(self.formats.for_path(text)) is not NpyFormat or not in_place:
            with super()._create_block(
                path, shape, dtype, order, overwrite, metadata, kwargs
            ) as arr:
                yield arr
            return
        meta = normalize_metadata(metadata, text)
        timeout = kwargs.pop("timeout", 0)
        # The store refuses overwrite=False if another large value was saved
        # at the path meanwhile (it has the same key in the store).
        made, whole = self._made_in(store, vpath, spec, overwrite, timeout, meta)
        with made as arr:
            yield arr
        if whole:
            return
        # Published in the store: the file now appears in the tree.
        ref = self._stored_as(store, vpath)
        old = self._data.get(vpath) if ref is not None else None
        if old is not None and not overwrite:  # a small value saved meanwhile
            store.delete(vpath)
            raise os_error(FileExistsError, text)
        updates: dict[str, Any] = dict.fromkeys(self._check_parents(vpath, create=True))
        if ref is not None:
            updates[vpath] = ref
        self._commit_file(vpath, updates, meta, old, ref, timeout)

    #: whether _commit_file makes the file's directories itself (see SharedMemoryBackend)
    _dirs_in_commit = False

    def _made_in(
        self,
        store: SharedArrayStore,
        vpath: str,
        spec: ArraySpec,
        overwrite: bool,
        timeout: float | None,
        meta: dict[str, Any] | None,
    ) -> tuple[contextlib.AbstractContextManager[Any], bool]:
        """(the store's block for an array made in place at ``vpath``, whether it commits the file).

        True: publishing the block also commits the file's other entries
        (its directories and metadata); False: :meth:`create_array` writes
        them after it.
        """
        return store._create(vpath, spec, overwrite, timeout), False

    def _remove_file(self, vpath: str) -> None:
        """Remove the file ``vpath`` (known to be one) and its metadata."""
        value = self._data.pop(vpath, None)
        self._data.pop(_META + vpath, None)
        self._drop_payload(value)

    def _in_place_store(self, nbytes: int) -> SharedArrayStore | None:
        """The store that ``create_array`` makes an array of ``nbytes`` in, if any."""
        return self.store if nbytes >= self.shm_threshold else None

    @staticmethod
    def _stored_as(store: SharedArrayStore, vpath: str) -> Any:
        """What the mapping holds for an array published in ``store`` under ``vpath``."""
        return ShmRef(store.name, vpath)

    def load(self, path: PathArg, **kwargs: Any) -> Any:
        text = as_str(path)
        vpath = virtual(text)
        try:
            fmt = self.formats.for_path(text)
        except UnsupportedFormatError:
            # a directory is reported as one, whatever its name
            if self._kind_of(vpath) == "dir":
                raise os_error(IsADirectoryError, text) from None
            raise
        if kwargs:
            self._check_options(kwargs, fmt.load_options, "load", text)
        try:
            value = self._data[vpath]
        except KeyError:
            if self._kind_of(vpath) == "dir":
                raise os_error(IsADirectoryError, text) from None
            raise self._missing(text, vpath) from None
        if isinstance(value, Link):
            value = self._follow(value, text)[1]
        if isinstance(value, ShmRef):
            value = self._store_for(value.store).get(value.key)
        fmt.check_load(value, text, **kwargs)
        return _frozen(value)

    def kind(self, path: PathArg) -> Kind | None:
        return self._kind_of(virtual(path))

    def _children(self, vpath: str) -> Iterable[tuple[str, bool]]:
        """(name, is_dir) of the direct children of a directory, unsorted."""
        prefix = "/" if vpath == "/" else vpath + "/"
        for key in list(self._data.keys()):
            if not key.startswith(prefix) or key == prefix:
                continue
            rest = key[len(prefix) :]
            if "/" not in rest:
                yield rest, False
            elif rest.index("/") == len(rest) - 1:
                yield rest[:-1], True

    def _missing(self, text: str, vpath: str) -> OSError:
        """The error POSIX gives for a missing path: ENOTDIR when a parent is a file."""
        for parent in virtual_parents(vpath):
            if parent in self._data:
                return os_error(NotADirectoryError, text)
        return os_error(FileNotFoundError, text)

    def _require_dir(self, text: str, vpath: str) -> None:
        kind = self._kind_of(vpath)
        if kind is None:
            raise self._missing(text, vpath)
        if kind == "file":
            raise os_error(NotADirectoryError, text)

    def list_dir(self, path: PathArg) -> list[str]:
        text = as_str(path)
        vpath = virtual(text)
        self._require_dir(text, vpath)
        return sorted(name for name, _ in self._children(vpath))

    def list_files(
        self,
        directory: PathArg,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
    ) -> list[str]:
        # One pass over the keys (one round trip for a Manager dict) instead of
        # the base class's walk, which asks once per entry.
        text = as_str(directory, "directory")
        vpath = virtual(text)
        self._require_dir(text, vpath)
        exts = _normalize_extensions(extensions)
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
        prefix = "/" if vpath == "/" else vpath + "/"
        rels = []
        for key in list(self._data.keys()):
            if not key.startswith(prefix) or key.endswith("/"):
                continue
            rel = key[len(prefix) :]
            if (recursive or "/" not in rel) and self._match(
                posixpath.basename(rel), pattern, exts
            ):
                rels.append(rel)
        return join_listing(text, rels)

    def ensure_directory(self, path: PathArg) -> str:
        text = as_str(path)
        vpath = virtual(text)
        if vpath != "/":
            if vpath in self._data:
                raise os_error(FileExistsError, text, "a file is in the way")
            missing = self._check_parents(vpath, create=True)
            if vpath + "/" not in self._data:
                missing.append(vpath + "/")
            if missing:
                self._data.update(dict.fromkeys(missing))
        return text

    def delete(self, path: PathArg, recursive: bool = False) -> None:
        text = as_str(path)
        vpath = virtual(text)
        kind = self._kind_of(vpath)
        if kind is None:
            raise self._missing(text, vpath)
        if kind == "file":
            self._remove_file(vpath)
            return
        if vpath == "/":
            raise SandboxError(text, "/")
        prefix = vpath + "/"
        for _ in range(_MAX_RETRIES):
            inside = [k for k in list(self._data.keys()) if k.startswith(prefix) and k != prefix]
            if inside and not recursive:
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), text)
            for key in sorted(inside, key=len, reverse=True):
                self._remove_file(key)
            try:
                self._remove_dir(prefix, text)
                return
            except OSError as exc:  # another process put a file in it meanwhile
                if exc.errno != errno.ENOTEMPTY or not recursive:
                    raise
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), text)

    def _remove_dir(self, prefix: str, text: str) -> None:
        """Remove the directory marker ``prefix`` (ENOTEMPTY where the store can tell)."""
        self._data.pop(prefix, None)

    def _same_path(self, a: Any, b: Any) -> bool:
        return virtual(a) == virtual(b)

    # -- links (to files; a link's key holds a Link, see the module docstring) ----------
    supports_symlinks = True

    def _follow(self, value: Any, text: str) -> tuple[list[str], Any]:
        """The paths a chain of links passes through, and the value at its end."""
        hops: list[str] = []
        while isinstance(value, Link):
            if len(hops) == _MAX_HOPS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), text)
            hops.append(value.target)
            try:
                value = self._data[value.target]
            except KeyError:
                raise os_error(FileNotFoundError, text, "the link leads nowhere") from None
        return hops, value

    def create_symlink(self, source: PathArg, link: PathArg, *, overwrite: bool = False) -> None:
        """Links lead to files: a directory as ``source`` raises ``IsADirectoryError``."""
        src_text, link_text = as_str(source), as_str(link)
        src, dst = virtual(src_text), virtual(link_text)
        check_link_names(src_text, link_text)
        kind = self._kind_of(src)
        if kind != "file":
            raise os_error(IsADirectoryError, src_text) if kind else self._missing(src_text, src)
        hops, _ = self._follow(Link(src), src_text)
        if dst in hops:
            raise OSError(errno.ELOOP, "the link would lead to itself", link_text)
        if dst == "/" or dst + "/" in self._data:
            raise os_error(FileExistsError, link_text)
        updates: dict[str, Any] = dict.fromkeys(self._check_parents(dst, create=True))
        if not (overwrite and self.is_symlink(dst)) and dst in self._data:
            raise os_error(FileExistsError, link_text)
        updates[dst] = Link(src)
        self._data.update(updates)

    def is_symlink(self, path: PathArg) -> bool:
        return isinstance(self._data.get(virtual(path)), Link)

    def stat(self, path: PathArg) -> StatResult:
        """Size and modification time are not recorded in memory (``None``)."""
        text = as_str(path)
        vpath = virtual(text)
        value = self._data.get(vpath)
        if isinstance(value, Link):
            self._follow(value, text)
            return StatResult("file", None, None, True)
        return super().stat(text)

    def clear_files_only(self) -> None:
        """Remove every file, link and metadata entry; keep the directories.

        For reusing one backend between runs without the old files.
        """
        keys = list(self._data.keys())
        for key in keys:  # each file with its metadata (in one step where the store allows)
            if not key.endswith("/") and not key.startswith(_META):
                self._remove_file(key)
        for key in keys:  # metadata whose file was gone already
            if key.startswith(_META):
                self._data.pop(key, None)

    # -- metadata -----------------------------------------------------------
    def load_metadata(self, path: PathArg) -> dict[str, Any]:
        text = as_str(path)
        try:
            meta = self._data[_META + virtual(text)]
        except KeyError:
            raise MetadataNotFoundError(text) from None
        return copy.deepcopy(dict(meta))

    def close(self) -> None:
        """Release the shared-memory store this backend created, if any."""
        for store in self._attached.values():
            store.close()
        self._attached.clear()
        if self._owns_store and self.store is not None:
            self.store.close()

    def __repr__(self) -> str:
        kind = "shared" if self.shared else "local"
        return f"MemoryBackend({kind}, store={self.store.name if self.store else None})"


def _rebuild(
    data: MutableMapping[str, Any],
    formats: FormatRegistry,
    store: SharedArrayStore | None,
    threshold: int,
) -> MemoryBackend:
    return MemoryBackend(data, formats=formats, store=store, shm_threshold=threshold)
