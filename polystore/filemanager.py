"""The one entry point: :class:`FileManager` routes each call to a named backend."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._renamed import renamed_keywords
from .base import StatResult, StorageBackend
from .exceptions import BackendNotFoundError, os_error
from .paths import PathArg, as_str, join_listing, sort_listing

#: what :meth:`FileManager.list_image_files` lists unless told otherwise
IMAGE_EXTENSIONS = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})

__all__ = ["IMAGE_EXTENSIONS", "FileManager"]

#: classes already found to be StorageBackends (see FileManager.get_backend)
_BACKEND_TYPES: set[type] = set()


class FileManager:
    """Routes ``save``, ``load``, listing and path queries to named backends.

    Args:
        registry: a :class:`~polystore.BackendRegistry`, or any mapping of
            names to :class:`~polystore.StorageBackend` instances.

    Every method takes the backend's name as ``backend``; extra keyword
    arguments go to that backend unchanged. A ``FileManager`` is cheap: make
    one per process and thread (see :class:`~polystore.FileManagerFactory`)
    and share the registry instead.
    """

    __slots__ = ("_registry",)

    def __init__(self, registry: Mapping[str, StorageBackend]) -> None:
        if registry is None:  # ValueError, as the original polystore raised
            raise ValueError(
                "FileManager needs a registry: pass polystore.BackendRegistry() or a dict "
                "of backend names to backend instances"
            )
        if not isinstance(registry, Mapping):
            raise TypeError(
                f"registry must be a BackendRegistry or a mapping of names to backends, "
                f"got {type(registry).__name__}"
            )
        self._registry = registry

    @property
    def registry(self) -> Mapping[str, StorageBackend]:
        """The registry this manager routes to."""
        return self._registry

    def get_backend(self, backend: str) -> StorageBackend:
        """The backend registered as ``backend`` (a name in any case: ``"DISK"`` is ``"disk"``).

        Raises:
            BackendNotFoundError: no backend has that name (also a ``KeyError``).
            TypeError: ``backend`` is not a string, or the entry is not a backend.
        """
        try:
            found = self._registry[backend]
        except (KeyError, TypeError) as exc:
            if not isinstance(backend, str):
                raise TypeError(
                    f"backend must be a name (str), got {type(backend).__name__}"
                ) from None
            if not isinstance(exc, KeyError):
                raise
            found = self._registry[self._name_ignoring_case(backend)]
        # Every call starts here: an ABC's isinstance costs tens of microseconds
        # with cold caches (benchmarks/pipeline_breakdown.py), a set lookup does not.
        if type(found) not in _BACKEND_TYPES:
            if not isinstance(found, StorageBackend):
                raise TypeError(
                    f"registry entry {backend!r} is a {type(found).__name__}, not a StorageBackend"
                )
            _BACKEND_TYPES.add(type(found))
        return found

    def _name_ignoring_case(self, backend: str) -> str:
        """The one registered name equal to ``backend`` but for case.

        Backend names are matched exactly first; ``"DISK"`` then finds
        ``"disk"``, as in the original polystore. Two names that differ only by
        case are not guessed between.
        """
        wanted = backend.casefold()
        matches = [name for name in self._registry if name.casefold() == wanted]
        if len(matches) != 1:
            raise BackendNotFoundError(backend, self._registry) from None
        return matches[0]

    # -- data -----------------------------------------------------------------
    def save(self, data: Any, output_path: PathArg, backend: str, **kwargs: Any) -> None:
        """Store ``data`` at ``output_path``; the extension picks the format.

        Common keywords: ``overwrite=False`` refuses to replace a file,
        ``metadata={...}`` stores a JSON-serialisable dict beside it.
        """
        self.get_backend(backend).save(data, output_path, **kwargs)

    def create_array(
        self, path: PathArg, shape: Any, dtype: Any, backend: str, **kwargs: Any
    ) -> contextlib.AbstractContextManager[Any]:
        """Make an array to fill in place, stored at ``path`` when the ``with`` block ends.

        .. code-block:: python

            with fm.create_array("tiles/0.npy", (512, 512), "f4", "shm") as out:
                out[...] = compute()        # written straight where readers will look

        Nothing is at ``path`` until the block ends without an exception.
        On ``shm``, a ``memory`` backend with a shared store and ``disk``
        (``.npy``), the array is the stored value itself: no copy is made.
        Keywords are those of :meth:`save` (``overwrite``, ``metadata``,
        format options such as zarr's ``chunks``) plus ``order``.
        """
        return self.get_backend(backend).create_array(path, shape, dtype, **kwargs)

    def load(self, file_path: PathArg, backend: str, **kwargs: Any) -> Any:
        """Return what is stored at ``file_path``."""
        return self.get_backend(backend).load(file_path, **kwargs)

    def save_batch(
        self, data_list: Sequence[Any], output_paths: Sequence[PathArg], backend: str, **kwargs: Any
    ) -> None:
        """Save ``data_list[i]`` at ``output_paths[i]`` for every ``i``.

        Raises:
            ValueError: the two sequences differ in length; nothing is saved.
        """
        self.get_backend(backend).save_batch(data_list, output_paths, **kwargs)

    def load_batch(self, file_paths: Sequence[PathArg], backend: str, **kwargs: Any) -> list[Any]:
        """Load every path, returning the values in the same order."""
        return self.get_backend(backend).load_batch(file_paths, **kwargs)

    def load_metadata(self, path: PathArg, backend: str) -> dict[str, Any]:
        """The metadata saved with ``path`` (``MetadataNotFoundError`` if none)."""
        return self.get_backend(backend).load_metadata(path)

    # -- directories ------------------------------------------------------------
    def list_files(
        self,
        directory: PathArg,
        backend: str,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        *,
        sort: str = "name",
    ) -> list[str]:
        """Sorted paths of the files in ``directory``, optionally filtered.

        ``pattern`` is a shell pattern matched against the file name and
        ``extensions`` a set such as ``{".npy", ".npz"}`` (case-insensitive).
        ``sort="natural"`` orders numbers by value (``img2`` before ``img10``),
        as the original polystore did; the default ``"name"`` orders by code point.
        """
        found = self.get_backend(backend).list_files(
            directory, pattern=pattern, extensions=extensions, recursive=recursive
        )
        return found if sort == "name" else sort_listing(found, sort)

    @renamed_keywords(path="directory")
    def list_dir(self, directory: PathArg, backend: str, *, sort: str = "name") -> list[str]:
        """Sorted names of the files and directories directly in ``directory``.

        ``sort`` is as for :meth:`list_files`.
        """
        found = self.get_backend(backend).list_dir(directory)
        return found if sort == "name" else sort_listing(found, sort)

    def ensure_directory(self, directory: PathArg, backend: str) -> str:
        """Create ``directory`` and its parents when missing; return it as ``str``."""
        return self.get_backend(backend).ensure_directory(directory)

    def exists(self, path: PathArg, backend: str) -> bool:
        """Whether a file or directory is at ``path``."""
        return self.get_backend(backend).exists(path)

    def is_file(self, path: PathArg, backend: str) -> bool:
        """Whether ``path`` is a file."""
        return self.get_backend(backend).is_file(path)

    def is_dir(self, path: PathArg, backend: str) -> bool:
        """Whether ``path`` is a directory."""
        return self.get_backend(backend).is_dir(path)

    def delete(self, path: PathArg, backend: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (``recursive=True`` when it is not empty)."""
        self.get_backend(backend).delete(path, recursive=recursive)

    @renamed_keywords(source_path="src", dest_path="dst")
    def copy(
        self,
        src: PathArg,
        dst: PathArg,
        backend: str,
        *,
        dst_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Copy the file ``src`` to ``dst``, on the same backend or onto ``dst_backend``.

        Nothing is unpickled unless this call passes ``allow_pickle=True``.
        """
        source = self.get_backend(backend)
        if dst_backend is None or dst_backend == backend:
            source.copy(src, dst, **kwargs)
            return
        target = self.get_backend(dst_backend)
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        value = source.load(src, allow_pickle=allow_pickle)
        meta = source._metadata_or_none(src)
        target.save(value, dst, metadata=meta, allow_pickle=allow_pickle, **kwargs)

    @renamed_keywords(source_path="src", dest_path="dst")
    def move(
        self,
        src: PathArg,
        dst: PathArg,
        backend: str,
        *,
        dst_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Move the file ``src`` to ``dst``, on the same backend or onto ``dst_backend``."""
        if dst_backend is None or dst_backend == backend:
            self.get_backend(backend).move(src, dst, **kwargs)
            return
        self.copy(src, dst, backend, dst_backend=dst_backend, **kwargs)
        self.get_backend(backend).delete(src)

    # -- links, stat, and the original polystore's directory helpers -------------------
    @renamed_keywords(
        source_path="source", symlink_path="link", overwrite_symlinks_only="overwrite"
    )
    def create_symlink(
        self, source: PathArg, link: PathArg, backend: str, *, overwrite: bool = False
    ) -> None:
        """Make ``link`` a symbolic link to the file ``source`` (disk, memory, shm).

        ``overwrite=True`` replaces a link already there, never a file. On disk
        the link is relative and may not leave the backend's ``root``.
        """
        self.get_backend(backend).create_symlink(source, link, overwrite=overwrite)

    def is_symlink(self, path: PathArg, backend: str) -> bool:
        """Whether ``path`` is a symbolic link (``False`` when nothing is there)."""
        return self.get_backend(backend).is_symlink(path)

    def stat(self, path: PathArg, backend: str) -> StatResult:
        """``kind``, ``size``, ``mtime`` (``None`` where unknown) and ``is_symlink`` of ``path``."""
        return self.get_backend(backend).stat(path)

    def delete_all(self, path: PathArg, backend: str) -> None:
        """Remove a file, a link, or a directory with everything in it."""
        self.get_backend(backend).delete_all(path)

    def find_file_recursive(self, directory: PathArg, filename: str, backend: str) -> str | None:
        """The path of the first file named ``filename`` under ``directory``, or ``None``.

        "First" in natural order of the paths, so a shallower ``a/x`` comes
        before ``a/b/x`` only when the names sort so; the original did the same.
        """
        for path in self.list_files(directory, backend, recursive=True, sort="natural"):
            if posixpath.basename(path) == filename:
                return path
        return None

    def list_image_files(
        self,
        directory: PathArg,
        backend: str,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        *,
        sort: str = "name",
    ) -> list[str]:
        """:meth:`list_files` for images: ``extensions`` defaults to :data:`IMAGE_EXTENSIONS`."""
        exts = IMAGE_EXTENSIONS if extensions is None else extensions
        return self.list_files(directory, backend, pattern, exts, recursive, sort=sort)

    def collect_dirs_and_files(
        self, directory: PathArg, backend: str, recursive: bool = True, *, sort: str = "name"
    ) -> tuple[list[str], list[str]]:
        """The directories (``directory`` itself first) and the files under ``directory``.

        Paths are spelled as :meth:`list_files` spells them; without
        ``recursive`` only the direct entries are collected.

        Raises:
            FileNotFoundError: ``directory`` does not exist.
            NotADirectoryError: ``directory`` is a file.
        """
        store = self.get_backend(backend)
        text = as_str(directory, "directory")
        dirs: list[str] = []
        files: list[str] = []
        pending = [""]
        while pending:  # breadth first, as the original walked
            rel_dir = pending.pop(0)
            for name in store.list_dir(posixpath.join(text, rel_dir) if rel_dir else text):
                rel = posixpath.join(rel_dir, name) if rel_dir else name
                kind = store.kind(posixpath.join(text, rel))
                if kind == "dir":
                    dirs.append(rel)
                    if recursive:
                        pending.append(rel)
                elif kind == "file":
                    files.append(rel)
        return (
            [text, *sort_listing(join_listing(text, dirs), sort)],
            sort_listing(join_listing(text, files), sort),
        )

    @renamed_keywords(source_dir="src", target_dir="dst", overwrite_symlinks_only="overwrite")
    def mirror_directory_with_symlinks(
        self,
        src: PathArg,
        dst: PathArg,
        backend: str,
        recursive: bool = True,
        *,
        overwrite: bool = False,
    ) -> int:
        """Make under ``dst`` the directories of ``src`` and a link to each of its files.

        Returns the number of links made. Every place a link goes is checked
        before anything is made: a file there (or a link, unless
        ``overwrite=True``) raises ``FileExistsError`` and nothing is changed.
        """
        store = self.get_backend(backend)
        src_text, dst_text = as_str(src), as_str(dst)
        dirs, files = self.collect_dirs_and_files(src_text, backend, recursive)
        base = len(join_listing(src_text, ["x"])[0]) - 1  # where a relative path starts

        def mirrored(path: str) -> str:
            return posixpath.join(dst_text, path[base:])

        for path in files:
            there = mirrored(path)
            link = store.is_symlink(there)
            if (link or store.exists(there)) and not (overwrite and link):
                raise os_error(FileExistsError, there)
        store.ensure_directory(dst_text)
        for path in dirs[1:]:
            store.ensure_directory(mirrored(path))
        for path in files:
            store.create_symlink(path, mirrored(path), overwrite=overwrite)
        return len(files)

    def __repr__(self) -> str:
        return f"FileManager({self._registry!r})"
