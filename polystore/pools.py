"""One registry shared by a pool of worker processes, one FileManager per worker.

The pattern polystore recommends for process pools:

.. code-block:: python

    with polystore.shared_registry() as registry:
        factory = polystore.FileManagerFactory(registry)
        with ProcessPoolExecutor(initializer=factory.initializer) as pool:
            pool.map(stage, items)          # stage() calls polystore.current_filemanager()

:func:`shared_registry` owns the shared resources and releases them on exit.
A :class:`FileManagerFactory` pickles to the recipe of its registry (a few
hundred bytes), never to data, and builds one :class:`~polystore.FileManager`
per process and thread on first use.
"""

from __future__ import annotations

import os
import pickle
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .base import StorageBackend
from .exceptions import NotShareableError, StorageError
from .filemanager import FileManager
from .registry import BackendRegistry

__all__ = [
    "FileManagerFactory",
    "current_filemanager",
    "install_on_dask",
    "shared_registry",
]

_factories: weakref.WeakSet[FileManagerFactory] = weakref.WeakSet()
_current: FileManagerFactory | None = None
#: factories unpickled in this process (received from another one), by token
_received: dict[str, FileManagerFactory] = {}


def _reset_after_fork() -> None:
    # A forked child inherits the parent's thread-local FileManagers, whose
    # owning threads do not exist in the child: start afresh.
    for factory in list(_factories):
        factory._local = threading.local()
        factory._lock = threading.Lock()  # another thread may have held it at fork time
        # The child rebuilds the registry from the recipe, as a spawned worker
        # does: a private backend then refuses to work (NotShareableError)
        # instead of the child writing into its own copy that the parent never sees.
        factory._registry = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _built_backends(registry: Mapping[str, StorageBackend]) -> Mapping[str, StorageBackend]:
    """The backends of ``registry`` that exist already (a registry builds the others on demand)."""
    if not isinstance(registry, BackendRegistry):
        return registry
    return {name: registry[name] for name in registry if registry.is_loaded(name)}


def _check_shareable(registry: Mapping[str, StorageBackend]) -> bytes:
    """Pickle ``registry``; on failure, name the backend that cannot cross a process boundary."""
    try:
        return pickle.dumps(registry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as whole:
        for name, backend in _built_backends(registry).items():
            try:
                pickle.dumps(backend)
            except NotShareableError as exc:
                raise NotShareableError(
                    f"backend {name!r} cannot be shared with workers: {exc}"
                ) from exc
            except Exception as exc:
                raise NotShareableError(
                    f"backend {name!r} ({type(backend).__name__}) cannot be pickled for "
                    f"workers: {exc}"
                ) from exc
        raise NotShareableError(f"the registry cannot be pickled for workers: {whole}") from whole


class FileManagerFactory:
    """Builds the :class:`~polystore.FileManager` of the calling process and thread.

    Args:
        registry: the registry every worker shares. Each of its backends must
            be shareable (a ``MemoryBackend`` over a plain ``dict`` is refused
            here with :class:`~polystore.NotShareableError`).
        premap: have :meth:`initializer` map every shared-memory store of the
            registry into the worker (:meth:`SharedArrayStore.map_all
            <polystore.SharedArrayStore.map_all>`), so that memory reserved
            before the pool started costs its first task nothing to reach.

    Calling the factory returns the same ``FileManager`` for every call from one
    thread of one process. The factory pickles to its registry's recipe, so it
    can be passed to pool initializers, task arguments and Dask workers.
    """

    def __init__(self, registry: Mapping[str, StorageBackend], *, premap: bool = False) -> None:
        if registry is None or not isinstance(registry, Mapping):
            raise TypeError(
                "FileManagerFactory needs a registry (for example from polystore.shared_registry())"
            )
        self._payload = _check_shareable(registry)
        self._registry: Mapping[str, StorageBackend] | None = registry
        self._token = uuid.uuid4().hex
        self.premap = bool(premap)
        self._local = threading.local()
        self._lock = threading.Lock()
        _factories.add(self)

    @classmethod
    def _rebuild(cls, token: str, payload: bytes, premap: bool = False) -> FileManagerFactory:
        # Unpickling the same factory twice in one process (one task after
        # another) must give the same FileManagers: reuse the first copy.
        for existing in list(_factories):
            if existing._token == token:
                return existing
        received = _received.get(token)
        if received is not None:
            return received
        factory = cls.__new__(cls)
        factory._payload = payload
        factory._registry = None
        factory._token = token
        factory.premap = premap
        factory._local = threading.local()
        factory._lock = threading.Lock()
        _factories.add(factory)
        # Keep it: joblib and Dask unpickle a factory per batch of tasks, and each
        # copy must find the same FileManagers instead of building new ones.
        _received[token] = factory
        return factory

    def __reduce__(self) -> tuple[Any, ...]:
        return (FileManagerFactory._rebuild, (self._token, self._payload, self.premap))

    @property
    def registry(self) -> Mapping[str, StorageBackend]:
        """The registry, unpickled once per process."""
        if self._registry is None:
            with self._lock:
                if self._registry is None:
                    self._registry = pickle.loads(self._payload)
        assert self._registry is not None
        return self._registry

    def __call__(self) -> FileManager:
        fm: FileManager | None = getattr(self._local, "fm", None)
        if fm is None:
            fm = self._local.fm = FileManager(self.registry)
        return fm

    def initializer(self) -> None:
        """Pool initializer: make this factory the process's :func:`current_filemanager`.

        With ``premap=True`` it also maps the registry's shared memory (see
        :meth:`map_shared_memory`).
        """
        global _current
        _current = self
        if self.premap:
            self.map_shared_memory()

    def map_shared_memory(self) -> int:
        """Map every shared-memory store the registry's built backends use; return the bytes."""
        from .shmstore import SharedArrayStore  # not at import: polystore imports cheaply

        stores: dict[str, Any] = {}
        for backend in _built_backends(self.registry).values():
            for store in (getattr(backend, "array_store", None), getattr(backend, "store", None)):
                if isinstance(store, SharedArrayStore):
                    stores.setdefault(store.name, store)
        return sum(store.map_all() for store in stores.values())

    @property
    def pickled_size(self) -> int:
        """Bytes this factory takes when pickled."""
        return len(pickle.dumps(self))

    def __repr__(self) -> str:
        return f"FileManagerFactory(token={self._token[:8]}, {self.pickled_size} bytes pickled)"


def current_filemanager() -> FileManager:
    """The FileManager of this process and thread, from the installed factory.

    Raises:
        StorageError: no factory was installed in this process (pass
            ``initializer=factory.initializer`` to the pool, or call
            :func:`install_on_dask`).
    """
    if _current is None:
        raise StorageError(
            "no FileManagerFactory is installed in this process; create the pool with "
            "initializer=factory.initializer (or call factory.initializer() yourself)"
        )
    return _current()


def uninstall() -> None:
    """Forget the factory installed in this process (mainly for tests and Dask teardown)."""
    global _current
    _current = None


@contextmanager
def shared_registry(
    *, max_bytes: int | None = None, spill_dir: str | os.PathLike[str] | None = None
) -> Iterator[BackendRegistry]:
    """A registry whose backends every receiving process shares.

    ``"memory"`` and ``"shm"`` are backed by shared-memory stores owned by the
    calling process (arrays never pass through a server process); ``"disk"``
    and ``"zarr"`` work as usual. On exit every shared resource the registry
    started is released.

    Args:
        max_bytes: cap on the shared memory each store may use.
        spill_dir: where values that do not fit in shared memory go instead
            (see :class:`~polystore.SharedArrayStore`).
    """
    from .shm_backend import SharedMemoryBackend

    backends: list[SharedMemoryBackend] = []
    registry = BackendRegistry()
    try:
        for name in ("memory", "shm"):
            backend = SharedMemoryBackend(max_bytes=max_bytes, spill_dir=spill_dir)
            backends.append(backend)
            registry.register(name, backend, replace=True)
        yield registry
    finally:
        registry.close()
        for backend in backends:
            backend.close()


def install_on_dask(client: Any, factory: FileManagerFactory, *, name: str = "polystore") -> None:
    """Give every worker of a Dask ``distributed`` client its FileManager.

    Kept here for existing callers; :func:`polystore.dask.install_on_dask` is the same.
    """
    from .dask import install_on_dask as install

    install(client, factory, name=name)
