"""Differential test: random operation sequences give the same answers on every backend.

Hypothesis drives a state machine that applies each operation to a memory
backend, a disk backend and a shared-memory backend side by side and demands
identical outcomes: the same value, or the same exception type.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from polystore import DiskBackend, MemoryBackend, SharedMemoryBackend, StorageBackend

DIRS = ["a", "a/b", "c"]
NAMES = ["x.npy", "y.json", "z.txt", "w.bin"]
PATHS = st.sampled_from([f"{d}/{n}" for d in DIRS for n in NAMES] + NAMES + DIRS + ["a/x.npy/q"])
DIRECTORIES = st.sampled_from([*DIRS, ".", "a/x.npy"])

VALUES = {
    ".npy": st.builds(
        lambda n, k: np.arange(n, dtype=np.int32) * k, st.integers(0, 5), st.integers(-3, 3)
    ),
    ".json": st.dictionaries(st.sampled_from("pqr"), st.integers() | st.text(max_size=3)),
    ".txt": st.text(max_size=8),
    ".bin": st.binary(max_size=8),
}


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        value = fn()
    except Exception as exc:  # the comparison is the point: record whatever happened
        return ("error", type(exc).__name__)
    if isinstance(value, np.ndarray):
        return ("array", (value.dtype.str, value.shape, value.tobytes()))
    return ("value", value)


class SameAnswers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="polystore-differential-")
        self.backends: dict[str, StorageBackend] = {
            "memory": MemoryBackend(),
            "disk": DiskBackend(root=self.tmp),
            "shm": SharedMemoryBackend(),
        }

    def teardown(self) -> None:
        for backend in self.backends.values():
            backend.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _same(self, op: Callable[[StorageBackend], Any]) -> Any:
        results = {name: _outcome(lambda b=b: op(b)) for name, b in self.backends.items()}
        first = results["memory"]
        for name, result in results.items():
            assert result == first, f"{name} answered {result}, memory answered {first}"
        return first

    @rule(path=PATHS, data=st.data(), overwrite=st.booleans(), with_meta=st.booleans())
    def save(self, path: str, data: st.DataObject, overwrite: bool, with_meta: bool) -> None:
        ext = "." + path.rsplit(".", 1)[-1] if "." in path else ".npy"
        value = data.draw(VALUES.get(ext, VALUES[".npy"]))
        meta = {"path": path} if with_meta else None
        self._same(lambda b: b.save(value, path, overwrite=overwrite, metadata=meta))

    @rule(path=PATHS)
    def load(self, path: str) -> None:
        self._same(lambda b: b.load(path))

    @rule(path=PATHS)
    def load_metadata(self, path: str) -> None:
        self._same(lambda b: b.load_metadata(path))

    @rule(path=PATHS)
    def queries(self, path: str) -> None:
        self._same(lambda b: (b.exists(path), b.is_file(path), b.is_dir(path)))

    @rule(directory=DIRECTORIES, recursive=st.booleans(), pattern=st.sampled_from([None, "*.npy"]))
    def list_files(self, directory: str, recursive: bool, pattern: str | None) -> None:
        self._same(lambda b: b.list_files(directory, pattern=pattern, recursive=recursive))

    @rule(directory=DIRECTORIES)
    def list_dir(self, directory: str) -> None:
        self._same(lambda b: b.list_dir(directory))

    @rule(directory=st.sampled_from([*DIRS, "a/x.npy", "a/x.npy/deeper"]))
    def ensure_directory(self, directory: str) -> None:
        self._same(lambda b: b.ensure_directory(directory))

    @rule(path=PATHS, recursive=st.booleans())
    def delete(self, path: str, recursive: bool) -> None:
        self._same(lambda b: b.delete(path, recursive=recursive))

    @rule(src=PATHS, dst=PATHS, move=st.booleans())
    def copy_or_move(self, src: str, dst: str, move: bool) -> None:
        if src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            return  # a copy across formats is a different operation
        if move:
            self._same(lambda b: b.move(src, dst))
        else:
            self._same(lambda b: b.copy(src, dst))

    @precondition(lambda self: True)
    @invariant()
    def same_tree(self) -> None:
        self._same(lambda b: b.list_files(".", recursive=True))


SameAnswers.TestCase.settings = settings(max_examples=150, stateful_step_count=30)


@pytest.mark.timeout(300)
class TestDifferential(SameAnswers.TestCase):  # type: ignore[misc,valid-type]
    pass
