"""A staging store that stops writing at the first failure, so a failed save can clean up.

zarr writes an array's chunks concurrently, on its own event loop, and when
one write fails (a full disk) it raises while the others carry on. Removing
the staging directory at that moment races with those writes, which recreate
directories and leave files behind. :class:`StagingStore` counts the writes
under way and refuses new ones once one has failed; :meth:`StagingStore.quiesce`
waits until none is under way, after which the directory can be removed for good.
"""

from __future__ import annotations

import threading
from typing import Any

from zarr.storage import LocalStore

__all__ = ["StagingStore"]


class _Guard:
    """What every copy of one staging store shares: writes under way, and the first failure."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.running = 0
        self.failure: BaseException | None = None


class StagingStore(LocalStore):
    """A :class:`zarr.storage.LocalStore` for a staging directory (see the module notes)."""

    def __init__(self, root: Any, *, read_only: bool = False, guard: _Guard | None = None) -> None:
        super().__init__(root, read_only=read_only)
        self._guard = guard if guard is not None else _Guard()

    def with_read_only(self, read_only: bool = False) -> StagingStore:
        return type(self)(self.root, read_only=read_only, guard=self._guard)

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        guard = self._guard
        with guard.changed:
            if guard.failure is not None:
                raise OSError(f"not written: an earlier write to this array failed ({key})")
            guard.running += 1
        try:
            await super()._set(key, value, exclusive=exclusive)
        except BaseException as exc:
            with guard.changed:
                if guard.failure is None:
                    guard.failure = exc
            raise
        finally:
            with guard.changed:
                guard.running -= 1
                guard.changed.notify_all()

    def quiesce(self, timeout: float = 60.0) -> bool:
        """Refuse further writes and wait until none is under way; ``False`` on timeout."""
        guard = self._guard
        with guard.changed:
            if guard.failure is None:
                guard.failure = OSError("the save was abandoned")
            return guard.changed.wait_for(lambda: guard.running == 0, timeout)
