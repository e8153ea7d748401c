"""The Dask ``distributed`` plugins behind :mod:`polystore.dask`.

Kept apart from :mod:`polystore.dask` because defining a plugin class imports
``distributed``, which ``import polystore`` and a task that only reads a
:class:`~polystore.dask.SharedArray` must never do.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import dask as _public
from . import pools

__all__ = ["FactoryPlugin", "StorePlugin"]


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
