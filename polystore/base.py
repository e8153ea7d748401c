"""The abstract storage backend.

A backend implements six primitives: :meth:`~StorageBackend.save`,
:meth:`~StorageBackend.load`, :meth:`~StorageBackend.kind`,
:meth:`~StorageBackend.list_dir`, :meth:`~StorageBackend.ensure_directory` and
:meth:`~StorageBackend.delete`. Everything else (``exists``, ``list_files``,
batches, ``copy``, ``move``, ...) has a default built on them, which a backend
may override when it can do better.

The semantics are those of a POSIX file system and hold on every backend;
:mod:`polystore.testing` checks them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from .exceptions import MetadataNotFoundError, NotShareableError, os_error
from .paths import PathArg, as_str, join_listing, split_ext

__all__ = ["Kind", "StatResult", "StorageBackend", "UnavailableBackend"]

Kind = Literal["file", "dir"]


class StatResult(NamedTuple):
    """What :meth:`StorageBackend.stat` knows about a path (a link is followed)."""

    #: ``"file"`` or ``"dir"``, of what the path names after links are followed
    kind: Kind
    #: bytes the file takes in its storage; ``None`` where the backend does not know
    size: int | None
    #: last modification, in seconds since the epoch; ``None`` where not recorded
    mtime: float | None
    #: whether the path itself is a symbolic link
    is_symlink: bool


def _normalize_extensions(extensions: Iterable[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    out = set()
    for ext in extensions:
        if not isinstance(ext, str):
            raise TypeError(f"extensions must be strings, got {ext!r}")
        ext = ext.lower()
        out.add(ext if ext.startswith(".") else "." + ext)
    return frozenset(out)


def check_link_names(source: str, link: str) -> None:
    """Refuse a link whose extension differs from its file's: the link would be read
    in another format than the file was written in.

    Raises:
        UnsupportedFormatError: the extensions differ.
    """
    if split_ext(source) != split_ext(link):
        from .exceptions import UnsupportedFormatError

        raise UnsupportedFormatError(
            link, reason=f"a link has the extension of what it links to ({source!r})"
        )


class StorageBackend(ABC):
    """Base class of every backend. Paths are ``str`` or ``os.PathLike[str]``."""

    #: short name used in messages and by :class:`~polystore.BackendRegistry`
    name: str = ""

    # -- capabilities: what the backend can do, read by polystore.testing ----------
    #: whether ``save(metadata=...)`` and :meth:`load_metadata` keep metadata
    supports_metadata: bool = True
    #: whether arrays are stored under any name, whatever its extension (zarr)
    arrays_under_any_name: bool = False
    #: whether :meth:`create_symlink` makes links (to files, on every such backend)
    supports_symlinks: bool = False
    #: keyword options that :meth:`save` and :meth:`create_array` (``save_options``)
    #: and :meth:`load` (``load_options``) take here besides those of the file's
    #: format; anything else is refused with ``TypeError`` (see
    #: :class:`~polystore.formats.Format`). ``None`` declares nothing: no check.
    save_options: frozenset[str] | None = None
    load_options: frozenset[str] | None = None

    @property
    def extensions(self) -> frozenset[str]:
        """The extensions (lower case, with the dot) of the files this backend stores.

        The default is that of :func:`~polystore.formats.default_formats`;
        backends with a ``formats`` registry of their own report its extensions.
        """
        from .formats import default_formats

        return frozenset(default_formats())

    @property
    def shareable(self) -> bool:
        """Whether a copy sent to another process (by pickle) sees the same files.

        A backend that is not shareable raises
        :class:`~polystore.NotShareableError` when pickled.
        """
        return True

    # -- primitives -------------------------------------------------------
    @abstractmethod
    def save(
        self,
        data: Any,
        path: PathArg,
        *,
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Store ``data`` at ``path``, replacing an existing file atomically.

        Missing parent directories are created. The format follows the
        extension of ``path``.

        Raises:
            FileExistsError: the file exists and ``overwrite`` is false.
            IsADirectoryError: ``path`` is a directory.
            NotADirectoryError: a parent of ``path`` is a file.
            UnsupportedFormatError: no format handles the extension or the value.
        """

    @abstractmethod
    def load(self, path: PathArg, **kwargs: Any) -> Any:
        """Return the value stored at ``path``.

        Raises:
            FileNotFoundError: nothing is stored at ``path``.
            IsADirectoryError: ``path`` is a directory.
        """

    @abstractmethod
    def kind(self, path: PathArg) -> Kind | None:
        """``"file"``, ``"dir"``, or ``None`` when nothing is at ``path``."""

    @abstractmethod
    def list_dir(self, path: PathArg) -> list[str]:
        """Sorted names (not paths) of the entries directly inside ``path``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            NotADirectoryError: ``path`` is a file.
        """

    @abstractmethod
    def ensure_directory(self, path: PathArg) -> str:
        """Create ``path`` and its parents if missing; return ``path`` as ``str``.

        Raises:
            FileExistsError: a file is at ``path``.
            NotADirectoryError: one of the parents of ``path`` is a file.
        """

    @abstractmethod
    def delete(self, path: PathArg, recursive: bool = False) -> None:
        """Remove a file, or a directory (non-empty ones need ``recursive=True``).

        Raises:
            FileNotFoundError: nothing is at ``path``.
            OSError: the directory is not empty and ``recursive`` is false.
        """

    # -- derived operations ---------------------------------------------
    def exists(self, path: PathArg) -> bool:
        """Whether anything (file or directory) is at ``path``."""
        return self.kind(path) is not None

    def is_file(self, path: PathArg) -> bool:
        """Whether ``path`` is a file."""
        return self.kind(path) == "file"

    def is_dir(self, path: PathArg) -> bool:
        """Whether ``path`` is a directory."""
        return self.kind(path) == "dir"

    def list_files(
        self,
        directory: PathArg,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
    ) -> list[str]:
        """Sorted paths of the files in ``directory``.

        Each result is ``directory`` (as given) joined with the file's path
        relative to it, so a result can be passed straight back to ``load``.
        ``pattern`` is matched with :func:`fnmatch.fnmatchcase` against the file
        name; ``extensions`` are compared case-insensitively, with the dot.

        Raises:
            FileNotFoundError: ``directory`` does not exist.
            NotADirectoryError: ``directory`` is a file.
        """
        text = as_str(directory, "directory")
        exts = _normalize_extensions(extensions)
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
        rels = [
            rel
            for rel in self._walk_files(text, recursive)
            if self._match(posixpath.basename(rel), pattern, exts)
        ]
        return join_listing(text, rels)

    def _walk_files(self, directory: str, recursive: bool) -> Iterable[str]:
        """Relative POSIX paths of the files under ``directory``."""
        kind = self.kind(directory)
        if kind is None:
            raise os_error(FileNotFoundError, directory)
        if kind == "file":
            raise os_error(NotADirectoryError, directory)
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            full_dir = posixpath.join(directory, rel_dir) if rel_dir else directory
            for name in self.list_dir(full_dir):
                rel = posixpath.join(rel_dir, name) if rel_dir else name
                child_kind = self.kind(posixpath.join(directory, rel))
                if child_kind == "file":
                    yield rel
                elif child_kind == "dir" and recursive:
                    stack.append(rel)

    @staticmethod
    def _match(name: str, pattern: str | None, exts: frozenset[str] | None) -> bool:
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            return False
        return not (exts is not None and posixpath.splitext(name)[1].lower() not in exts)

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
        """Make an array to fill in place; it is stored at ``path`` when the block ends.

        .. code-block:: python

            with backend.create_array("out/frame.npy", (2048, 2048), "f4") as out:
                np.multiply(image, 2, out=out)

        Nothing is at ``path`` until the block ends without an exception;
        then the array appears there in one step, as with :meth:`save` (whose
        ``overwrite``, ``metadata`` and other keyword arguments it takes). An
        exception publishes nothing. After the block the array is read-only.

        This default makes the array in this process's memory and saves it at
        the end (one copy); backends that can write where the value will
        live (shm, a memory backend with a shared store, disk ``.npy``) do
        so, with no copy.

        Raises:
            TypeError: a bad ``shape`` or ``dtype`` (before anything is made).
            ValueError: a negative size or a bad ``order``.
            IsADirectoryError: ``path`` is a directory.
            FileExistsError: ``overwrite=False`` and the file exists (when the
                block starts, or when it ends).
        """
        return self._create_block(path, shape, dtype, order, overwrite, metadata, kwargs)

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
        """The context manager :meth:`create_array` returns (overridable).

        This default: an array of this process, saved when the block ends.
        """
        from .formats import array_spec

        spec = array_spec(shape, dtype, order)
        self._check_new_file(path, overwrite)
        formats = getattr(self, "formats", None)
        fmt = None if formats is None else formats.for_path(as_str(path))
        # Options that saving would refuse, and a format that takes no array,
        # fail now, not after the work.
        self._check_options(
            kwargs, frozenset() if fmt is None else fmt.save_options, "save", as_str(path)
        )
        if fmt is not None:
            probe = np.empty((0,) * len(spec.shape), spec.dtype)
            fmt.normalize(probe, as_str(path), **kwargs)
        arr = np.empty(spec.shape, spec.dtype, order=spec.order)
        yield arr
        arr.flags.writeable = False
        self.save(arr, path, overwrite=overwrite, metadata=metadata, **kwargs)

    def _check_options(
        self,
        kwargs: dict[str, Any],
        theirs: frozenset[str] | None,
        op: Literal["save", "load"],
        text: str,
    ) -> None:
        """Refuse a keyword option that neither this backend nor the format takes.

        ``theirs``: the options of the file's format (``Format.save_options``
        or ``load_options``); ``None``, undeclared, passes every option on.

        Raises:
            TypeError: naming the options refused and those taken.
        """
        if not kwargs:
            return
        own = self.save_options if op == "save" else self.load_options
        if own is None or theirs is None:
            return
        taken = own | theirs | {"allow_pickle"}  # (every format takes allow_pickle)
        unknown = set(kwargs) - taken
        if unknown:
            named = "overwrite, metadata, " if op == "save" else ""
            raise TypeError(
                f"{type(self).__name__}.{op}() of {text!r} got unexpected keyword arguments "
                f"{sorted(unknown)}; it takes {named}{', '.join(sorted(taken))}"
            )

    def _check_new_file(self, path: PathArg, overwrite: bool) -> None:
        """Refuse, before any work, what saving at ``path`` would refuse at the end."""
        text = as_str(path)
        found = self.kind(text)
        if found == "dir":
            raise os_error(IsADirectoryError, text)
        if found == "file" and not overwrite:
            raise os_error(FileExistsError, text)
        parent = posixpath.dirname(text.rstrip("/"))
        while found is None and parent not in ("", "/", "."):
            if self.kind(parent) == "file":
                raise os_error(NotADirectoryError, text)
            parent = posixpath.dirname(parent)

    def save_batch(self, data_list: Sequence[Any], paths: Sequence[PathArg], **kwargs: Any) -> None:
        """Save each item of ``data_list`` at the matching path.

        Raises:
            ValueError: the two sequences differ in length (nothing is saved).
        """
        data_list, paths = list(data_list), list(paths)
        if len(data_list) != len(paths):
            raise ValueError(
                f"save_batch needs one path per item: got {len(data_list)} items "
                f"and {len(paths)} paths"
            )
        for path in paths:
            as_str(path)
        for data, path in zip(data_list, paths, strict=False):
            self.save(data, path, **kwargs)

    def load_batch(self, paths: Sequence[PathArg], **kwargs: Any) -> list[Any]:
        """Load each path, in order."""
        return [self.load(path, **kwargs) for path in paths]

    def copy(self, src: PathArg, dst: PathArg, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Copy the file ``src`` to ``dst`` (directories are not copied).

        Object arrays are copied only with ``allow_pickle=True``: without it
        nothing is unpickled, even when the value is converted to another format.
        """
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        value = self.load(src, allow_pickle=allow_pickle)  # the usual errors for src first
        meta = self._metadata_or_none(src)
        self.save(
            value,
            dst,
            overwrite=overwrite,
            metadata=meta,
            allow_pickle=allow_pickle,
            **kwargs,
        )

    def move(self, src: PathArg, dst: PathArg, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Move the file ``src`` to ``dst``; moving a file onto itself changes nothing."""
        if self._same_path(src, dst) and self.kind(src) == "file":
            if not overwrite:
                raise os_error(FileExistsError, as_str(dst))
            return
        self.copy(src, dst, overwrite=overwrite, **kwargs)
        self.delete(src)

    def _same_path(self, a: Any, b: Any) -> bool:
        """Whether two paths name the same entry (lexically)."""
        return posixpath.normpath(as_str(a)) == posixpath.normpath(as_str(b))

    def _metadata_or_none(self, path: PathArg) -> dict[str, Any] | None:
        try:
            return self.load_metadata(path)
        except MetadataNotFoundError:
            return None

    def load_metadata(self, path: PathArg) -> dict[str, Any]:
        """The metadata saved with ``path``.

        Raises:
            MetadataNotFoundError: ``path`` has none (a ``FileNotFoundError``).
        """
        raise MetadataNotFoundError(as_str(path))

    # -- links, stat, recursive delete --------------------------------------------
    def create_symlink(self, source: PathArg, link: PathArg, *, overwrite: bool = False) -> None:
        """Make ``link`` a symbolic link to ``source`` (missing parents are created).

        ``overwrite=True`` replaces a link already at ``link``; a file or a
        directory there is never replaced. Reading ``link`` reads ``source``
        as it is then; deleting ``link`` removes the link only.

        Raises:
            NotImplementedError: the backend has no links (``supports_symlinks``).
            FileNotFoundError: nothing is at ``source``.
            FileExistsError: something is at ``link`` (a link, unless ``overwrite``).
        """
        raise NotImplementedError(
            f"the {self.name or type(self).__name__} backend has no symbolic links; "
            "the disk, memory and shm backends have"
        )

    def is_symlink(self, path: PathArg) -> bool:
        """Whether ``path`` is a symbolic link (``False`` if nothing is there)."""
        as_str(path)
        return False

    def stat(self, path: PathArg) -> StatResult:
        """Kind, size and modification time of what is at ``path`` (links followed).

        Raises:
            FileNotFoundError: nothing is at ``path`` (or a link leads nowhere).
        """
        text = as_str(path)
        kind = self.kind(text)
        if kind is None:
            raise os_error(FileNotFoundError, text)
        return StatResult(kind, None, None, self.is_symlink(text))

    def delete_all(self, path: PathArg) -> None:
        """Remove a file, a link or a directory with everything in it.

        Raises:
            FileNotFoundError: nothing is at ``path``.
        """
        self.delete(path, recursive=True)

    def close(self) -> None:
        """Release what the backend holds. The default holds nothing."""

    def __enter__(self) -> StorageBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnavailableBackend(StorageBackend):
    """Stands in for a backend that cannot work in this process; every call says why.

    A registry sent to another process holds one of these where the original
    backend could not follow (a private in-memory backend, or shared memory of
    another machine), so the mistake surfaces as a clear
    :class:`~polystore.NotShareableError` on first use, not as missing files.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise NotShareableError(self.reason)

    save = load = kind = list_dir = ensure_directory = delete = _refuse
    list_files = load_metadata = create_symlink = is_symlink = stat = delete_all = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnavailableBackend, (self.name, self.reason))

    @property
    def extensions(self) -> frozenset[str]:
        return frozenset()

    def __repr__(self) -> str:
        return f"UnavailableBackend({self.name!r})"
