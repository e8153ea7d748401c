"""Conformance tests of links, ``stat`` and ``delete_all``, mixed into
:class:`~polystore.testing.BackendTests`.

One rule set on every backend that has links (``supports_symlinks``): a link
leads to a file, reading it reads that file as it is now, deleting it leaves
the file, and nothing that is not a link is ever replaced by one. Backends
without links refuse to make one and report no path as a link.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .base import StorageBackend
from .exceptions import UnsupportedFormatError

__all__ = ["LinkTests"]


def _need_links(backend: StorageBackend) -> None:
    if not backend.supports_symlinks:
        pytest.skip(f"{type(backend).__name__} has no symbolic links")


class LinkTests:
    """Needs the suite's ``backend`` fixture and raw helpers."""

    def raw_get(self, backend: StorageBackend, path: str) -> Any:  # from the suite
        raise NotImplementedError

    def raw_set(self, backend: StorageBackend, path: str, value: Any) -> None:  # from the suite
        raise NotImplementedError

    def test_symlink_reads_the_file_as_it_is_now(self, backend: StorageBackend) -> None:
        _need_links(backend)
        self.raw_set(backend, "d/a.npy", np.arange(3))
        backend.create_symlink("d/a.npy", "e/f/link.npy")
        assert backend.is_symlink("e/f/link.npy")
        assert not backend.is_symlink("d/a.npy") and not backend.is_symlink("missing.npy")
        np.testing.assert_array_equal(backend.load("e/f/link.npy"), np.arange(3))
        self.raw_set(backend, "d/a.npy", np.arange(5))  # a link, not a copy
        np.testing.assert_array_equal(backend.load("e/f/link.npy"), np.arange(5))
        assert backend.kind("e/f/link.npy") == "file"
        assert backend.list_files("e", recursive=True) == ["e/f/link.npy"]
        assert backend.list_dir("e/f") == ["link.npy"]
        found = backend.stat("e/f/link.npy")
        assert found.kind == "file" and found.is_symlink

    def test_deleting_a_symlink_keeps_the_file(self, backend: StorageBackend) -> None:
        _need_links(backend)
        self.raw_set(backend, "a.npy", np.ones(2))
        backend.create_symlink("a.npy", "b.npy")
        backend.delete("b.npy")
        assert not backend.exists("b.npy") and not backend.is_symlink("b.npy")
        np.testing.assert_array_equal(self.raw_get(backend, "a.npy"), np.ones(2))

    def test_symlink_refusals(self, backend: StorageBackend) -> None:
        _need_links(backend)
        self.raw_set(backend, "a.npy", np.zeros(1))
        self.raw_set(backend, "b.npy", np.ones(1))
        with pytest.raises(FileNotFoundError):
            backend.create_symlink("missing.npy", "l.npy")
        assert not backend.exists("l.npy") and not backend.is_symlink("l.npy")
        for overwrite in (False, True):  # a file is never replaced by a link
            with pytest.raises(FileExistsError):
                backend.create_symlink("a.npy", "b.npy", overwrite=overwrite)
        np.testing.assert_array_equal(self.raw_get(backend, "b.npy"), np.ones(1))
        with pytest.raises(UnsupportedFormatError, match="extension"):
            backend.create_symlink("a.npy", "l.json")

    def test_replacing_a_symlink(self, backend: StorageBackend) -> None:
        _need_links(backend)
        self.raw_set(backend, "a.npy", np.zeros(1))
        self.raw_set(backend, "b.npy", np.ones(1))
        backend.create_symlink("a.npy", "l.npy")
        with pytest.raises(FileExistsError):
            backend.create_symlink("b.npy", "l.npy")
        backend.create_symlink("b.npy", "l.npy", overwrite=True)
        np.testing.assert_array_equal(backend.load("l.npy"), np.ones(1))
        assert backend.list_dir(".") == ["a.npy", "b.npy", "l.npy"]

    def test_symlink_whose_file_is_gone(self, backend: StorageBackend) -> None:
        _need_links(backend)
        self.raw_set(backend, "a.npy", np.zeros(1))
        backend.create_symlink("a.npy", "l.npy")
        backend.delete("a.npy")
        assert backend.is_symlink("l.npy")
        with pytest.raises(FileNotFoundError):
            backend.load("l.npy")
        with pytest.raises(FileNotFoundError):
            backend.stat("l.npy")
        backend.delete("l.npy")
        assert not backend.is_symlink("l.npy")

    def test_backend_without_symlinks_refuses(self, backend: StorageBackend) -> None:
        if backend.supports_symlinks:
            pytest.skip(f"{type(backend).__name__} has symbolic links")
        self.raw_set(backend, "a.npy", np.zeros(1))
        with pytest.raises(NotImplementedError, match="no symbolic links"):
            backend.create_symlink("a.npy", "l.npy")
        assert not backend.is_symlink("a.npy") and not backend.exists("l.npy")

    # -- stat and delete_all: every backend ---------------------------------------
    def test_stat(self, backend: StorageBackend) -> None:
        self.raw_set(backend, "d/a.npy", np.zeros(4))
        found = backend.stat("d/a.npy")
        assert (found.kind, found.is_symlink) == ("file", False)
        assert found.size is None or found.size > 0
        assert found.mtime is None or found.mtime > 0
        assert backend.stat("d").kind == "dir"
        for missing in ("nope.npy", "d/a.npy/below.npy"):
            with pytest.raises(FileNotFoundError):
                backend.stat(missing)

    def test_delete_all(self, backend: StorageBackend) -> None:
        self.raw_set(backend, "t/a.npy", np.zeros(1))
        self.raw_set(backend, "t/u/v/b.npy", np.zeros(1))
        self.raw_set(backend, "keep.npy", np.zeros(1))
        backend.delete_all("t/u/v/b.npy")
        assert backend.is_dir("t/u/v")
        backend.delete_all("t")
        assert not backend.exists("t") and not backend.exists("t/a.npy")
        assert backend.is_file("keep.npy")
        with pytest.raises(FileNotFoundError):
            backend.delete_all("t")
