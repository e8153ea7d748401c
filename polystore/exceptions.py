"""Exceptions raised by polystore.

Every error derives from :class:`StorageError`. Where a builtin exception
already names the failure (a missing file, a bad value, a timeout), the
polystore error inherits from that builtin too, so ``except FileNotFoundError``
written against plain files keeps working against any backend.

All exceptions pickle by their constructor arguments: an error raised inside a
worker process reaches the parent with its type, message and attributes intact.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BackendNotFoundError",
    "CorruptFileError",
    "LockRequiredError",
    "LockTimeoutError",
    "MetadataNotFoundError",
    "MissingDependencyError",
    "NotShareableError",
    "ReservedNameError",
    "SandboxError",
    "SharedValueReleasedError",
    "ShmFullError",
    "StorageError",
    "StorageResolutionError",
    "StoreClosedError",
    "StoreNotFoundError",
    "UnsupportedFormatError",
]


class StorageError(Exception):
    """Base class of every error polystore raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class BackendNotFoundError(StorageError, KeyError):
    """A backend name is not in the registry.

    Attributes:
        name: the name that was asked for.
        available: the names the registry knows, sorted.
    """

    def __init__(self, name: str, available: Iterable[str] = ()) -> None:
        self.name = name
        self.available = tuple(sorted(available))
        super().__init__(name, self.available)

    def __str__(self) -> str:
        choices = ", ".join(repr(n) for n in self.available) or "none"
        return f"no storage backend named {self.name!r}; available backends: {choices}"


#: The original polystore's name for a backend that cannot be found, kept so
#: that ``except StorageResolutionError`` in code written for it still works.
#: It is the same class, not a subclass: both names catch the same errors.
StorageResolutionError = BackendNotFoundError


class UnsupportedFormatError(StorageError, ValueError):
    """A path's extension, or a value's type, has no format that handles it.

    Attributes:
        path: the offending path (or a description of the value).
        supported: the supported extensions, sorted.
        reason: optional detail.
    """

    def __init__(self, path: str, supported: Iterable[str] = (), reason: str = "") -> None:
        self.path = path
        self.supported = tuple(sorted(supported))
        self.reason = reason
        super().__init__(path, self.supported, reason)

    def __str__(self) -> str:
        msg = f"unsupported format for {self.path!r}"
        if self.reason:
            msg += f": {self.reason}"
        if self.supported:
            msg += f"; supported extensions: {', '.join(self.supported)}"
        return msg


class CorruptFileError(UnsupportedFormatError):
    """A stored file is damaged, or was crafted, so that its format cannot read it.

    Nothing is read from such a file beyond what it takes to tell: a header
    that declares more data than the file holds is refused before any memory
    is set aside for it.

    Attributes:
        path: the damaged file (as the caller named it).
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, (), reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))

    def __str__(self) -> str:
        return f"cannot read {self.path!r}, the file is damaged: {self.reason}"


class MetadataNotFoundError(StorageError, FileNotFoundError):
    """A path has no metadata stored for it (or does not exist)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(errno.ENOENT, f"no metadata stored for {path!r}", path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path,))


class SandboxError(StorageError, PermissionError):
    """A path resolves outside the backend's root directory."""

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self.root = root
        super().__init__(errno.EACCES, f"path {path!r} resolves outside the root {root!r}", path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.root))


class LockTimeoutError(StorageError, TimeoutError):
    """A file lock could not be acquired within its timeout.

    Attributes:
        path: the path whose lock was wanted.
        timeout: the number of seconds waited.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        super().__init__(path, timeout)

    def __str__(self) -> str:
        return f"could not lock {self.path!r} within {self.timeout:g} s"


class NotShareableError(StorageError, TypeError):
    """An object that only lives in one process was asked to cross a process boundary."""


class SharedValueReleasedError(StorageError, KeyError):
    """A shared value was asked for after it was released, or after its owner closed.

    Attributes:
        key: the key the value was stored under.
        store: the name of the shared array store that held it.
    """

    def __init__(self, key: str, store: str) -> None:
        self.key = key
        self.store = store
        super().__init__(key, store)

    def __str__(self) -> str:
        return (
            f"the shared value {self.key!r} of store {self.store!r} was released, or the "
            "client that owned the store closed; views taken before stay valid"
        )


class ShmFullError(StorageError, MemoryError):
    """Shared memory has no room for a value; nothing was written.

    Attributes:
        needed: bytes the value needs.
        available: bytes that were free.
        where: the file system or store that is full.
    """

    def __init__(self, needed: int, available: int, where: str) -> None:
        self.needed = needed
        self.available = available
        self.where = where
        super().__init__(needed, available, where)

    def __str__(self) -> str:
        return (
            f"not enough shared memory in {self.where}: need {self.needed} bytes, "
            f"{self.available} available"
        )


class StoreClosedError(StorageError, ValueError):
    """An operation was attempted on a closed store or backend."""


class StoreNotFoundError(StorageError, FileNotFoundError):
    """No live shared array store has that name: none was made, or its owner died.

    A dead owner's store stays in shared memory until ``python -m polystore
    gc`` removes it; the message says which case it is.
    """


class MissingDependencyError(StorageError, ImportError):
    """A package that a feature or a backend needs is not installed.

    Attributes:
        package: the requirement that is missing, e.g. ``"zarr>=3"``.
        extra: the polystore extra that installs it, if one does.
        needed_by: what needs it, e.g. ``"backend 'zarr'"``.
    """

    def __init__(self, package: str, extra: str | None = None, needed_by: str = "this") -> None:
        self.package = package
        self.extra = extra
        self.needed_by = needed_by
        super().__init__(package, extra, needed_by)

    def __str__(self) -> str:
        text = f"{self.package} is required for {self.needed_by} and is not installed"
        if self.extra is None:
            return text
        return f"{text}; install it with: pip install 'polystore[{self.extra}]'"


class LockRequiredError(StorageError, ValueError):
    """A write must hold a lock to be safe, and the storage offers none; nothing was written.

    Attributes:
        path: the path that was to be written.
        reason: what needed the lock and how to avoid needing it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return f"refusing to write {self.path!r} without a lock: {self.reason}"


class ReservedNameError(StorageError, ValueError):
    """A path uses a name polystore keeps for its own files (temporary, lock, metadata).

    Attributes:
        path: the offending path.
        prefix: the reserved name prefix.
    """

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        super().__init__(path, prefix)

    def __str__(self) -> str:
        return (
            f"path {self.path!r} uses a reserved name: names starting with {self.prefix!r} "
            "hold polystore's temporary, lock and metadata files"
        )


def os_error(cls: type[OSError], path: str, message: str | None = None) -> OSError:
    """Build a builtin ``OSError`` subclass with the conventional errno and filename."""
    codes = {
        FileNotFoundError: errno.ENOENT,
        FileExistsError: errno.EEXIST,
        IsADirectoryError: errno.EISDIR,
        NotADirectoryError: errno.ENOTDIR,
        PermissionError: errno.EACCES,
    }
    code = codes.get(cls, errno.EIO)
    return cls(code, message or os.strerror(code), path)
