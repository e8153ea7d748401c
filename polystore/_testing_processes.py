"""Conformance tests across process boundaries, mixed into :class:`~polystore.testing.BackendTests`.

Kept apart from the rest of the suite because they need module-level helpers
that a spawned process can import, and objects that fail on purpose.
"""

from __future__ import annotations

import multiprocessing
import pickle
from typing import Any

import numpy as np
import pytest

from .base import StorageBackend, UnavailableBackend
from .exceptions import NotShareableError

__all__ = ["ProcessBoundaryTests"]


class _FailsToPickle(UnavailableBackend):
    """A backend that cannot cross a process boundary, as one holding a lock or a socket."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(f"cannot pickle {type(self).__name__} (a fault injected by the test)")


def _round_trip_in_child(backend: StorageBackend, src: str, dst: str) -> Any:
    """Run in a spawned process: read what the parent saved, save a changed copy."""
    try:
        value = np.array(backend.load(src))  # a copy: a view would outlive the backend
        backend.save(value * 2, dst)
        return value
    finally:
        backend.close()


class ProcessBoundaryTests:
    """Tests of what crosses a process boundary: backends, and the errors they raise."""

    def raw_get(self, backend: StorageBackend, path: str) -> Any:
        raise NotImplementedError  # BackendTests defines it

    def _assert_same(self, got: Any, expected: Any) -> None:
        from .testing import assert_same_value  # the module that imports this one

        assert_same_value(got, expected)

    # -- crossing process boundaries ------------------------------------------------
    @pytest.mark.timeout(120)
    def test_spawned_process_sees_the_same_files(self, backend: StorageBackend) -> None:
        if not backend.shareable:
            with pytest.raises(NotShareableError):
                pickle.dumps(backend)
            return
        from concurrent.futures import ProcessPoolExecutor

        sample = np.arange(12, dtype=np.int32).reshape(3, 4)
        backend.save(sample, "parent/a.npy")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            job = pool.submit(_round_trip_in_child, backend, "parent/a.npy", "child/b.npy")
            self._assert_same(job.result(timeout=100), sample)
        self._assert_same(backend.load("child/b.npy"), sample * 2)
        self._assert_same(self.raw_get(backend, "child/b.npy"), sample * 2)

    def test_shareability_check_names_what_cannot_be_sent(self, backend: StorageBackend) -> None:
        from .pools import FileManagerFactory

        broken = _FailsToPickle("broken", "a fault injected by the test")
        with pytest.raises(NotShareableError, match=r"'broken'.*injected"):
            FileManagerFactory({"broken": broken, "tested": backend})
        if backend.shareable:
            FileManagerFactory({"tested": backend})
        else:
            with pytest.raises(NotShareableError, match="'tested'"):
                FileManagerFactory({"tested": backend})

    # -- errors cross process boundaries ---------------------------------------
    def test_errors_pickle(self, backend: StorageBackend) -> None:
        raised: list[BaseException] = []
        for action in (
            lambda: backend.load("missing.npy"),
            lambda: backend.save({"not": "an array"}, "bad.unknown-ext"),
            lambda: backend.list_files("missing-dir"),
        ):
            try:
                action()
            except Exception as exc:
                raised.append(exc)
        assert len(raised) == 3
        for error in raised:
            clone = pickle.loads(pickle.dumps(error))
            assert type(clone) is type(error)
            assert str(clone) == str(error)
