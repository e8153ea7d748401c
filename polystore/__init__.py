"""polystore: one API for moving data between worker processes and pipeline stages.

Importing the package loads numpy and the standard library only. Backends and
helpers with heavier dependencies are imported the first time their name is
used (``polystore.ZarrBackend`` imports zarr only when you build one).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .base import StorageBackend
from .exceptions import (
    BackendNotFoundError,
    CorruptFileError,
    LockTimeoutError,
    MetadataNotFoundError,
    NotShareableError,
    SandboxError,
    ShmFullError,
    StorageError,
    StorageResolutionError,
    StoreClosedError,
    UnsupportedFormatError,
)
from .filemanager import FileManager
from .formats import Format, FormatRegistry, default_formats
from .memory import MemoryBackend
from .registry import BackendRegistry

if TYPE_CHECKING:
    from .dask import install_on_dask
    from .disk import DiskBackend
    from .locks import atomic_update_json, file_lock
    from .pools import FileManagerFactory, current_filemanager, shared_registry
    from .shm_backend import SharedMemoryBackend
    from .shmstore import SharedArrayStore
    from .zarr_backend import ZarrBackend

# name -> module that defines it, imported on first attribute access
_LAZY = {
    "DiskBackend": "polystore.disk",
    "file_lock": "polystore.locks",
    "atomic_update_json": "polystore.locks",
    "SharedArrayStore": "polystore.shmstore",
    "SharedMemoryBackend": "polystore.shm_backend",
    "ZarrBackend": "polystore.zarr_backend",
    "shared_registry": "polystore.pools",
    "FileManagerFactory": "polystore.pools",
    "current_filemanager": "polystore.pools",
    "install_on_dask": "polystore.dask",
}

__all__ = [
    "BackendNotFoundError",
    "BackendRegistry",
    "CorruptFileError",
    "DiskBackend",
    "FileManager",
    "FileManagerFactory",
    "Format",
    "FormatRegistry",
    "LockTimeoutError",
    "MemoryBackend",
    "MetadataNotFoundError",
    "NotShareableError",
    "SandboxError",
    "SharedArrayStore",
    "SharedMemoryBackend",
    "ShmFullError",
    "StorageBackend",
    "StorageError",
    "StorageResolutionError",
    "StoreClosedError",
    "UnsupportedFormatError",
    "ZarrBackend",
    "__version__",
    "atomic_update_json",
    "current_filemanager",
    "default_formats",
    "file_lock",
    "install_on_dask",
    "shared_registry",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polystore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
