"""Conformance tests of ``create_array``, mixed into :class:`~polystore.testing.BackendTests`.

Every backend makes arrays in place with one contract: nothing is at the
path until the block ends without an exception, then the array is there,
with its metadata, as if saved; bad arguments fail before anything is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .base import StorageBackend

__all__ = ["CreateArrayTests"]


class CreateArrayTests:
    """Tests of :meth:`StorageBackend.create_array` (needs the suite's ``backend`` fixture)."""

    def raw_get(self, backend: StorageBackend, path: str) -> Any:  # from the suite
        raise NotImplementedError

    def test_create_array_appears_on_exit(self, backend: StorageBackend) -> None:
        with backend.create_array("made/a.npy", (40, 30), "f4", metadata={"run": 3}) as out:
            assert out.shape == (40, 30) and out.dtype == np.float32 and out.flags.writeable
            assert backend.kind("made/a.npy") is None  # nothing to see yet
            out[:] = np.arange(1200, dtype=np.float32).reshape(40, 30)
        expected = np.arange(1200, dtype=np.float32).reshape(40, 30)
        np.testing.assert_array_equal(backend.load("made/a.npy"), expected)
        np.testing.assert_array_equal(self.raw_get(backend, "made/a.npy"), expected)
        assert backend.load_metadata("made/a.npy") == {"run": 3}
        assert not out.flags.writeable  # the stored value: not to be changed through it
        with pytest.raises(ValueError, match="read-only"):
            out[0, 0] = 1

    def test_create_array_orders_and_dtypes(self, backend: StorageBackend) -> None:
        with backend.create_array("f.npy", (3, 4), ">i2", order="F") as out:
            out[:] = np.arange(12).reshape(3, 4)
        got = backend.load("f.npy")
        # as if saved: what this backend keeps of a big-endian, Fortran-ordered array
        backend.save(np.asfortranarray(np.arange(12, dtype=">i2").reshape(3, 4)), "saved.npy")
        assert got.dtype == backend.load("saved.npy").dtype and got[2, 3] == 11
        with backend.create_array("empty.npy", (0, 3), np.float64) as out:
            pass
        assert backend.load("empty.npy").shape == (0, 3)

    def test_create_array_publishes_nothing_on_error(self, backend: StorageBackend) -> None:
        backend.save(np.zeros(3), "keep.npy", metadata={"v": 1})
        with pytest.raises(KeyError, match="boom"), backend.create_array("keep.npy", 5) as out:
            out[:] = 7
            raise KeyError("boom")
        np.testing.assert_array_equal(backend.load("keep.npy"), np.zeros(3))
        assert backend.load_metadata("keep.npy") == {"v": 1}
        with pytest.raises(KeyError), backend.create_array("new/b.npy", 5):
            raise KeyError("boom")
        assert backend.kind("new/b.npy") is None

    @pytest.mark.parametrize(
        ("shape", "dtype", "error"),
        [((-1,), "f4", ValueError), ("x", "f4", TypeError), ((2,), object, TypeError),
         ((2,), "no such dtype", TypeError)],
    )  # fmt: skip
    def test_create_array_refuses_bad_arguments_up_front(
        self, backend: StorageBackend, shape: Any, dtype: Any, error: type[Exception]
    ) -> None:
        with pytest.raises(error):
            backend.create_array("bad.npy", shape, dtype).__enter__()
        assert backend.kind("bad.npy") is None

    def test_create_array_follows_the_save_rules(self, backend: StorageBackend) -> None:
        backend.save(np.ones(2), "exists.npy")
        with pytest.raises(FileExistsError):
            backend.create_array("exists.npy", 2, overwrite=False).__enter__()
        backend.ensure_directory("adir")
        with pytest.raises(IsADirectoryError):
            backend.create_array("adir", 2).__enter__()
        with pytest.raises(NotADirectoryError):
            backend.create_array("exists.npy/under.npy", 2).__enter__()
        with backend.create_array("exists.npy", 4) as out:  # overwrite is the default
            out[:] = 2
        np.testing.assert_array_equal(backend.load("exists.npy"), np.full(4, 2.0))
