"""The Dask ``distributed`` plugins behind :mod:`polystore.dask`.

Kept apart from :mod:`polystore.dask` because defining a plugin class imports
``distributed``, which ``import polystore`` and a task that only reads a
:class:`~polystore.dask.SharedArray` must never do.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from distributed.active_memory_manager import ReduceReplicas, Suggestion
from distributed.diagnostics.plugin import WorkerPlugin

from . import dask as _public
from . import pools

__all__ = ["FactoryPlugin", "KeepHandleReplicas", "StorePlugin", "keep_handle_replicas"]


class FactoryPlugin(WorkerPlugin):
    """Installs a :class:`~polystore.FileManagerFactory` in each worker process."""

    def __init__(self, factory: pools.FileManagerFactory) -> None:
        self.factory = factory

    def setup(self, worker: Any) -> None:
        self.factory.initializer()

    def teardown(self, worker: Any) -> None:
        pools.uninstall()


class StorePlugin(WorkerPlugin):
    """Tells each worker process which client-owned store takes its shared results.

    It carries the store's name and directory only: workers attach to the
    store, they never own it.
    """

    def __init__(self, name: str, directory: str, node: str) -> None:
        self.name = name
        self.directory = directory
        self.node = node

    def setup(self, worker: Any) -> None:
        # A worker that starts may replace one that was killed: reclaim what it left.
        _public._worker_started(self.name, self.directory, self.node)

    def teardown(self, worker: Any) -> None:
        _public._set_result_store(None, None, None)


#: what the scheduler calls a SharedArray (``TaskState.type``)
_HANDLE_TYPE = f"{_public.SharedArray.__module__}.{_public.SharedArray.__qualname__}"


class KeepHandleReplicas(ReduceReplicas):
    """Dask's ``ReduceReplicas``, except for keys whose value is a :class:`SharedArray`.

    Invariant kept: a result's value lives as long as the handle on the worker
    that computed it (its owner). ``ReduceReplicas`` drops the extra replicas
    of a key, and never on a worker where a task waiting for the key runs: so
    once a consumer elsewhere has its copy, it drops the owner's, and the value
    went from under the consumer. A handle's replicas cost a few hundred bytes;
    they are all kept until Dask forgets the key.
    """

    def run(self) -> Generator[Suggestion, Any, None]:
        for suggestion in super().run():
            if suggestion.ts.type != _HANDLE_TYPE:
                yield suggestion


def keep_handle_replicas(dask_scheduler: Any) -> int:
    """On the scheduler: put :class:`KeepHandleReplicas` in place of ``ReduceReplicas``.

    Returns how many policies were replaced (0: the memory manager is off, or
    configured without ``ReduceReplicas``, or this was done before).
    """
    manager = dask_scheduler.extensions.get("amm")
    if manager is None:
        return 0
    replaced = 0
    for policy in list(manager.policies):
        if type(policy) is ReduceReplicas:
            manager.policies.discard(policy)
            manager.add_policy(KeepHandleReplicas())
            replaced += 1
    return replaced
