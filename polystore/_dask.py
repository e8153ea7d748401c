"""The Dask ``distributed`` worker plugin behind :func:`polystore.install_on_dask`.

Kept apart from :mod:`polystore.pools` because defining it imports
``distributed``, which ``import polystore`` must never do.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import pools

__all__ = ["FactoryPlugin"]


class FactoryPlugin(WorkerPlugin):
    """Installs a :class:`~polystore.FileManagerFactory` in each worker process."""

    def __init__(self, factory: pools.FileManagerFactory) -> None:
        self.factory = factory

    def setup(self, worker: Any) -> None:
        self.factory.initializer()

    def teardown(self, worker: Any) -> None:
        pools.uninstall()
