"""The one entry point: :class:`FileManager` routes each call to a named backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._renamed import renamed_keywords
from .base import StorageBackend
from .exceptions import BackendNotFoundError
from .paths import sort_listing

__all__ = ["FileManager"]


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
        if not isinstance(found, StorageBackend):
            raise TypeError(
                f"registry entry {backend!r} is a {type(found).__name__}, not a StorageBackend"
            )
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
    def save(self, data: Any, output_path: Any, backend: str, **kwargs: Any) -> None:
        """Store ``data`` at ``output_path``; the extension picks the format.

        Common keywords: ``overwrite=False`` refuses to replace a file,
        ``metadata={...}`` stores a JSON-serialisable dict beside it.
        """
        self.get_backend(backend).save(data, output_path, **kwargs)

    def create_array(
        self, path: Any, shape: Any, dtype: Any, backend: str, **kwargs: Any
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

    def load(self, file_path: Any, backend: str, **kwargs: Any) -> Any:
        """Return what is stored at ``file_path``."""
        return self.get_backend(backend).load(file_path, **kwargs)

    def save_batch(
        self, data_list: Sequence[Any], output_paths: Sequence[Any], backend: str, **kwargs: Any
    ) -> None:
        """Save ``data_list[i]`` at ``output_paths[i]`` for every ``i``.

        Raises:
            ValueError: the two sequences differ in length; nothing is saved.
        """
        self.get_backend(backend).save_batch(data_list, output_paths, **kwargs)

    def load_batch(self, file_paths: Sequence[Any], backend: str, **kwargs: Any) -> list[Any]:
        """Load every path, returning the values in the same order."""
        return self.get_backend(backend).load_batch(file_paths, **kwargs)

    def load_metadata(self, path: Any, backend: str) -> dict[str, Any]:
        """The metadata saved with ``path`` (``MetadataNotFoundError`` if none)."""
        return self.get_backend(backend).load_metadata(path)

    # -- directories ------------------------------------------------------------
    def list_files(
        self,
        directory: Any,
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
    def list_dir(self, directory: Any, backend: str, *, sort: str = "name") -> list[str]:
        """Sorted names of the files and directories directly in ``directory``.

        ``sort`` is as for :meth:`list_files`.
        """
        found = self.get_backend(backend).list_dir(directory)
        return found if sort == "name" else sort_listing(found, sort)

    def ensure_directory(self, directory: Any, backend: str) -> str:
        """Create ``directory`` and its parents when missing; return it as ``str``."""
        return self.get_backend(backend).ensure_directory(directory)

    def exists(self, path: Any, backend: str) -> bool:
        """Whether a file or directory is at ``path``."""
        return self.get_backend(backend).exists(path)

    def is_file(self, path: Any, backend: str) -> bool:
        """Whether ``path`` is a file."""
        return self.get_backend(backend).is_file(path)

    def is_dir(self, path: Any, backend: str) -> bool:
        """Whether ``path`` is a directory."""
        return self.get_backend(backend).is_dir(path)

    def delete(self, path: Any, backend: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (``recursive=True`` when it is not empty)."""
        self.get_backend(backend).delete(path, recursive=recursive)

    @renamed_keywords(source_path="src", dest_path="dst")
    def copy(
        self, src: Any, dst: Any, backend: str, *, dst_backend: str | None = None, **kwargs: Any
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
        self, src: Any, dst: Any, backend: str, *, dst_backend: str | None = None, **kwargs: Any
    ) -> None:
        """Move the file ``src`` to ``dst``, on the same backend or onto ``dst_backend``."""
        if dst_backend is None or dst_backend == backend:
            self.get_backend(backend).move(src, dst, **kwargs)
            return
        self.copy(src, dst, backend, dst_backend=dst_backend, **kwargs)
        self.get_backend(backend).delete(src)

    def __repr__(self) -> str:
        return f"FileManager({self._registry!r})"
