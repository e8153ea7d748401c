"""Dask ``distributed`` on one big machine: workers share arrays instead of copying them.

Dask moves every array a task needs from another worker through its network
stack, even between processes of one host, and keeps a copy per worker. This
module puts such arrays in the host's shared memory once and passes small
handles instead:

.. code-block:: python

    import polystore.dask as psd

    weights = psd.share(client, big_array)     # one copy for the whole host
    client.map(score, chunks, weights=weights) # tasks call weights.get()

    @psd.shared_result                         # the result goes to shared memory
    def stage(x):
        return heavy(x)

    def consume(handle):
        view = handle.get()                    # read-only, zero-copy
        ...

    def stage_in_place(handle):                # no copy at all: computed in shared memory
        with psd.result_array(shape, "f4") as out:
            np.multiply(handle.get(), 2, out=out.array)
        return out.handle

**Who owns the memory.** Every client gets one
:class:`~polystore.SharedArrayStore`, created in the client's process the
first time it is needed and removed with all its segments when the client
closes (or is garbage collected, or the client's interpreter exits). Workers
only attach to it.

* :func:`share` puts the array from the client; the value lives until
  :meth:`SharedArray.release` (or :func:`release`) or until the client closes.
* A :func:`shared_result` task puts its result from the worker and returns
  the *owning* handle (a task using :func:`result_array` computes into the
  store and returns it likewise). Dask keeps that object on the worker for as long as
  the key is wanted; when Dask forgets the key the worker drops it and its
  finaliser deletes the value. Copies of the handle (pickled to another worker
  or to the client) never delete anything, so a value lives exactly as long as
  Dask holds its key. Views already taken stay valid after the delete: the
  store recycles the memory when the last view dies.
* A worker killed before it drops its results (``SIGKILL``, the out-of-memory
  killer) leaves them in the store. Each result's key names the process that
  put it; every worker that starts (a nanny restarting the dead one) deletes
  the results of dead processes, and :func:`reclaim` does it on demand. The
  store itself, and so every segment, goes when the client closes.

The handle Dask holds is the owner of a result, so a result lives as long as
its key on the worker that computed it. Dask's active memory manager, on by
default, drops extra replicas of a key every two seconds, and would pick the
owner's as soon as a consumer on another worker holds a copy: :func:`install`
therefore replaces its ``ReduceReplicas`` policy on the scheduler with one
that leaves handles alone (a handle is a few hundred bytes), which needs
polystore importable on the scheduler too. Dask moving the key off that
worker otherwise (``rebalance``, retiring the worker, spilling the handle to
disk, which its small size makes unlikely) drops the owner early: copies
elsewhere then raise :class:`~polystore.exceptions.SharedValueReleasedError`
on ``get()``.

**More than one host.** A handle carries the node it lives on
(:func:`polystore.shm_backend.node_id`, which ``POLYSTORE_NODE_ID``
overrides). On any other node :meth:`SharedArray.get` never gives wrong
data: by default a worker of the array's node copies it out and Dask brings
the copy over (a network transfer, as plain Dask would make);
``get(fetch=False)`` asks for shared memory only and raises
:class:`~polystore.NotShareableError` naming both nodes instead, as it does
when no worker of the array's node is there. Releasing and ``shared_result``
work on the array's node only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .exceptions import (
    NotShareableError,
    SharedValueReleasedError,
    StorageError,
    StoreClosedError,
    StoreNotFoundError,
)
from .shm_backend import node_id

if TYPE_CHECKING:
    from .pools import FileManagerFactory
    from .shmstore import SharedArrayStore

__all__ = [
    "ResultArray",
    "SharedArray",
    "SharedValueReleasedError",
    "close",
    "install_on_dask",
    "reclaim",
    "release",
    "result_array",
    "share",
    "shared_result",
]

F = TypeVar("F", bound=Callable[..., Any])

# Stores attached in this process, by (directory, name); forgotten after fork.
_attached: dict[tuple[str, str], SharedArrayStore] = {}
# The store each client owns, by client id.
_owned: dict[str, SharedArrayStore] = {}
# Where shared_result puts values in this worker process (set by StorePlugin):
# (directory, name, node of the store).
_result_store: tuple[str, str, str] | None = None


def _forget_attached() -> None:
    _attached.clear()


os.register_at_fork(after_in_child=_forget_attached)


class SharedArray:
    """A small, picklable handle to an array in one host's shared memory.

    It pickles to its description only (node, store, key, shape, dtype);
    never to the data, and never with the right to delete it.
    """

    def __init__(
        self, node: str, store: str, directory: str, key: str, shape: tuple[int, ...], dtype: str
    ) -> None:
        self.node = node
        self.store = store
        self.directory = directory
        self.key = key
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            SharedArray,
            (self.node, self.store, self.directory, self.key, self.shape, self.dtype.str),
        )

    def __repr__(self) -> str:
        return (
            f"SharedArray({self.key!r}, shape={self.shape}, dtype={self.dtype}, "
            f"store={self.store!r}, node={self.node!r})"
        )

    @property
    def nbytes(self) -> int:
        """Size of the array in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def get(self, *, fetch: bool = True) -> np.ndarray[Any, Any]:
        """A read-only view of the array, with no copy (on the array's node).

        On another node, with ``fetch`` (the default), a worker of the
        array's node copies it out and Dask brings the copy here (read-only
        too): the data is right, at the cost of a network transfer. With
        ``fetch=False`` (shared memory only) that is an error instead.

        Raises:
            NotShareableError: on another node, with ``fetch=False`` or with no
                worker of the array's node to fetch from; the message names both.
            SharedValueReleasedError: the value was released, or its client closed.
        """
        if fetch and node_id() != self.node:
            return _fetch(self)
        self._check_node()
        try:
            return _store(self.directory, self.store, self.key).get(self.key)
        except KeyError:
            raise SharedValueReleasedError(self.key, self.store) from None

    def release(self) -> None:
        """Delete the value; views already taken stay valid.

        Raises:
            NotShareableError: this process runs on another node than the array.
            SharedValueReleasedError: the value was already released.
        """
        self._check_node()
        try:
            _store(self.directory, self.store, self.key).delete(self.key)
        except KeyError:
            raise SharedValueReleasedError(self.key, self.store) from None

    def _check_node(self) -> None:
        here = node_id()
        if here != self.node:
            raise NotShareableError(
                f"shared array {self.key!r} lives in the shared memory of node {self.node!r} "
                f"and cannot be read on node {here!r}; run the task on a worker of "
                f"{self.node!r} or pass the array as a plain Dask result"
            )


def _copy_out(handle: SharedArray) -> np.ndarray[Any, Any]:
    """On the array's node: a copy of it, for Dask to send to another node."""
    return np.array(handle.get(fetch=False))


def _fetch(handle: SharedArray) -> np.ndarray[Any, Any]:
    """The array of ``handle``, copied from a worker of its node through Dask."""
    from distributed import get_client, get_worker, worker_client

    def fetch_with(client: Any) -> np.ndarray[Any, Any]:
        nodes = client.run(node_id)
        owners = [address for address, node in nodes.items() if node == handle.node]
        if not owners:
            raise NotShareableError(
                f"shared array {handle.key!r} lives on node {handle.node!r}; this process "
                f"runs on node {node_id()!r} and no worker of {handle.node!r} is there to "
                "fetch it from"
            )
        future = client.submit(
            _copy_out, handle, workers=owners, allow_other_workers=False, pure=False
        )
        copy: np.ndarray[Any, Any] = future.result()
        return copy

    try:
        get_worker()
    except ValueError:  # not in a task: use this process's client
        copy = fetch_with(get_client())
    else:
        with worker_client() as client:  # leaves the worker's thread while waiting
            copy = fetch_with(client)
    copy.flags.writeable = False
    return copy


def _store(directory: str, name: str, key: str) -> SharedArrayStore:
    """The store ``name`` that holds ``key``.

    Raises:
        SharedValueReleasedError: the store is gone (its client closed).
    """
    try:
        return _attach(directory, name)
    except (StoreNotFoundError, StoreClosedError) as e:
        raise SharedValueReleasedError(key, name) from e


def _attach(directory: str, name: str) -> SharedArrayStore:
    """The store ``name``: this process's own, or an attachment cached per process.

    Raises:
        StoreNotFoundError, StoreClosedError: there is no such store (any more).
    """
    from .shmstore import SharedArrayStore

    for owned in _owned.values():
        if owned.name == name and owned.directory == directory and not owned.closed:
            return owned
    store = _attached.get((directory, name))
    if store is None or store.closed:
        store = SharedArrayStore.attach(name, directory=directory)
        _attached[directory, name] = store
    return store


def _client_store(client: Any) -> SharedArrayStore:
    """The store ``client`` owns, created (and announced to its workers) on first use."""
    store = _owned.get(client.id)
    if store is not None and not store.closed:
        return store
    from ._dask import StorePlugin, keep_handle_replicas
    from .shmstore import SharedArrayStore

    store = SharedArrayStore()
    _owned[client.id] = store
    _close_with(client, store)
    plugin = StorePlugin(store.name, store.directory, node_id())
    client.register_plugin(plugin, name=_plugin_name(store))
    # The memory manager must not drop the owner's replica of a result.
    client.run_on_scheduler(keep_handle_replicas)
    return store


def _plugin_name(store: SharedArrayStore) -> str:
    return f"polystore-store-{store.name}"


class _CloseStore:
    """Closes a client's store while the client closes.

    Dask has no public hook for that; a client runs the ``teardown`` of its
    preloads first thing in ``close()``, so this object joins them. The
    store's own finaliser and ``atexit`` still cover clients that are never
    closed.
    """

    name = "polystore-store"

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    async def start(self) -> None:
        pass

    async def teardown(self) -> None:
        _close_id(self.client_id)


def _close_with(client: Any, store: SharedArrayStore) -> None:
    preloads = getattr(getattr(client, "preloads", None), "_preloads", None)
    if isinstance(preloads, list):
        preloads.append(_CloseStore(client.id))
    weakref.finalize(client, _close_id, client.id)


def _close_id(client_id: str) -> None:
    store = _owned.pop(client_id, None)
    if store is not None:
        store.close()


def share(client: Any, array: Any) -> SharedArray:
    """Put ``array`` once in this host's shared memory; return a handle for tasks.

    The client's store holds the copy until :func:`release` or until the
    client closes. Tasks on any worker of this host call ``handle.get()``.

    Raises:
        TypeError: ``array`` is not a numpy array.
        NotShareableError: an object array (it holds pointers into this process).
        ShmFullError: not enough shared memory.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"share() takes a numpy array, not {type(array).__name__}")
    return _put(_client_store(client), array)


def _put(store: SharedArrayStore, array: np.ndarray[Any, Any], kind: str = "") -> SharedArray:
    key = f"dask-{kind}{uuid.uuid4().hex}"
    store.put(key, array)
    return SharedArray(node_id(), store.name, store.directory, key, array.shape, array.dtype.str)


def release(*handles: SharedArray) -> None:
    """Delete the values of ``handles`` (see :meth:`SharedArray.release`)."""
    for handle in handles:
        handle.release()


def close(client: Any) -> None:
    """Remove ``client``'s store now, with every value in it (closing the client does it too)."""
    _close_id(client.id)


def _set_result_store(name: str | None, directory: str | None, node: str | None) -> None:
    global _result_store
    if name is None or directory is None or node is None:
        _result_store = None
    else:
        _result_store = (directory, name, node)


# A result's key names the worker process that put it, so that the values of a
# worker killed before it could drop them can be found: "dask-r<pid>-<uuid>".
_RESULT = "r"


def _reclaim(store: SharedArrayStore) -> int:
    from .locks import pid_alive

    removed = 0
    for key in list(store):  # a snapshot: the loop deletes
        head = key[len("dask-" + _RESULT) :].split("-", 1)[0]
        if key.startswith("dask-" + _RESULT) and head.isdigit() and not pid_alive(int(head)):
            with contextlib.suppress(KeyError):  # its finaliser may run meanwhile
                store.delete(key)
                removed += 1
    return removed


def reclaim(client: Any) -> int:
    """Delete the shared results of worker processes of this host that are dead.

    A worker killed (by ``SIGKILL``, or the out-of-memory killer) cannot drop
    its results, so nothing deletes them. Every worker that starts under
    :func:`install` runs this for its store, so a nanny that restarts a killed
    worker reclaims what it left; call it yourself where no nanny does.
    Returns how many values were deleted.
    """
    store = _owned.get(client.id)
    return 0 if store is None or store.closed else _reclaim(store)


def _worker_started(name: str, directory: str, node: str) -> None:
    if node != node_id():
        _set_result_store(name, directory, node)  # shared_result will say why it refuses
        return
    try:
        store = _attach(directory, name)
    except (StoreNotFoundError, StoreClosedError):
        # The client closed its store; the scheduler still holds its plugin.
        _set_result_store(None, None, None)
        return
    _set_result_store(name, directory, node)
    _reclaim(store)


def _delete_quietly(directory: str, name: str, key: str) -> None:
    # Dask forgot the key: the value may already be gone (released by hand, or
    # the client closed its store), which is what this wanted anyway.
    try:
        _attach(directory, name).delete(key)
    except (KeyError, StorageError):
        pass


class _SharedResult:
    """A task whose array result goes to shared memory (see :func:`shared_result`).

    A class, not a closure: cloudpickle copies the globals a closure defined
    in ``__main__`` reads, and this must read the worker's own store setting.
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__name__: str = getattr(func, "__name__", "task")
        functools.update_wrapper(self, func)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SharedResult, (self.func,))

    def __call__(self, *args: Any, **kwargs: Any) -> SharedArray:
        result = self.func(*args, **kwargs)
        if not isinstance(result, np.ndarray):
            task = self.__name__
            raise TypeError(
                f"{task}() returned {type(result).__name__}; shared_result takes numpy arrays only"
            )
        directory, name = _worker_store(f"{self.__name__}()")
        handle = _put(_attach(directory, name), result, f"{_RESULT}{os.getpid()}-")
        weakref.finalize(handle, _delete_quietly, directory, name, handle.key)
        return handle


def _worker_store(task: str) -> tuple[str, str]:
    """(directory, name) of the store results go to from this worker, checked."""
    if _result_store is None:
        raise StorageError(
            "this worker has no shared array store: call polystore.dask.install(client) "
            "before submitting tasks that return shared results"
        )
    directory, name, node = _result_store
    here = node_id()
    if here != node:
        raise NotShareableError(
            f"the client's shared array store lives on node {node!r}; a worker on node "
            f"{here!r} cannot put {task}'s result there; return it as a plain Dask result"
        )
    return directory, name


class ResultArray:
    """What :func:`result_array` yields: the array to fill, then the handle to return.

    Attributes:
        array: a writable array in the client's shared memory (inside the block).
        handle: the owning :class:`SharedArray` of the published value (after it).
    """

    array: np.ndarray[Any, Any]
    handle: SharedArray


@contextlib.contextmanager
def result_array(shape: Any, dtype: Any = float) -> Iterator[ResultArray]:
    """In a task: compute a result straight into shared memory, and return its handle.

    .. code-block:: python

        def stage(handle):
            with polystore.dask.result_array(shape, "f4") as out:
                np.add(handle.get(), 1, out=out.array)    # no private array, no copy
            return out.handle

    The value is published when the block ends (nothing is if it raises) and
    belongs to the handle, as a :func:`shared_result` does: it is deleted
    when Dask forgets the task's key.

    Raises:
        StorageError: the worker was given no store (call :func:`install`).
        NotShareableError: the worker is on another node than the store.
        TypeError, ValueError: a bad shape or dtype, before anything is made.
    """
    directory, name = _worker_store("result_array()")
    store = _attach(directory, name)
    key = f"dask-{_RESULT}{os.getpid()}-{uuid.uuid4().hex}"
    out = ResultArray()
    with store.create(key, shape, dtype) as arr:
        out.array = arr
        yield out
    handle = SharedArray(node_id(), store.name, store.directory, key, arr.shape, arr.dtype.str)
    weakref.finalize(handle, _delete_quietly, directory, name, key)
    out.handle = handle


def shared_result(func: F) -> F:
    """Make a task return its array result through shared memory, as a :class:`SharedArray`.

    Submit such tasks through a client that has a store (call :func:`install`
    first). The value is deleted when Dask forgets the task's key (see the
    module docs).

    Raises (in the task):
        TypeError: the task returned something other than a numpy array.
        StorageError: the worker was given no store.
    """
    return _SharedResult(func)  # type: ignore[return-value]  # same arguments, SharedArray result


def install(client: Any) -> None:
    """Create ``client``'s store now and tell its workers, so :func:`shared_result` works.

    Also keeps the scheduler's active memory manager from dropping the replica
    of a result that owns its value (see the module docs).
    """
    _client_store(client)


def install_on_dask(client: Any, factory: FileManagerFactory, *, name: str = "polystore") -> None:
    """Give every worker of a Dask ``distributed`` client its FileManager.

    After this call, :func:`~polystore.current_filemanager` works inside tasks
    on every worker, present and future. Backends that live in one machine's
    memory (``shm``) refuse to work on a worker of another machine.
    """
    from ._dask import FactoryPlugin

    client.register_plugin(FactoryPlugin(factory), name=name)
