"""A file and its metadata commit together: a killed writer leaves old + old or new + new.

Each case runs the operation in a forked child that SIGKILLs itself just before
its n-th rename, link or unlink, for n = 0, 1, 2, ... until the operation
completes without reaching the kill; every step of the commit is thereby
interrupted once. After each kill the parent reads what the path holds.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore._sidecar import read_entries
from polystore.disk import DiskBackend
from polystore.exceptions import MetadataNotFoundError
from polystore.locks import is_reserved

pytestmark = pytest.mark.timeout(60)

State = tuple[int | None, dict[str, Any] | None]
_PATCHED = ("replace", "rename", "link", "unlink")


def _kill_at(step: int) -> None:
    """In this (child) process, die by SIGKILL just before the ``step``-th file system change."""
    count = [0]
    for name in _PATCHED:
        original = getattr(os, name)

        def counted(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return _original(*args, **kwargs)

        setattr(os, name, counted)


def _run_killed(step: int, operation: Callable[[], None]) -> bool:
    """Run ``operation`` in a child killed at ``step``; ``True`` if it completed instead."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            _kill_at(step)
            operation()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return False
    assert os.WEXITSTATUS(status) == 0, "the operation failed in the child"
    return True


def _state(disk: DiskBackend, path: str) -> State:
    if not disk.exists(path):
        return (None, None)
    value = int(disk.load(path)[0])
    try:
        return (value, disk.load_metadata(path))
    except MetadataNotFoundError:
        return (value, None)


def _put(disk: DiskBackend, path: str, state: State) -> None:
    value, meta = state
    if value is not None:
        disk.save(np.full(3, value), path, metadata=meta)


def _every_step(
    tmp_path: Path,
    before: dict[str, State],
    operation: Callable[[DiskBackend], None],
    after: dict[str, State],
) -> int:
    """Kill ``operation`` at every step; each path must hold its state from before or after.

    Returns the step at which the operation first completed.
    """
    for step in range(50):
        root = tmp_path / f"step{step}"
        root.mkdir()
        disk = DiskBackend(root)
        for path, state in before.items():
            _put(disk, path, state)
        done = _run_killed(step, lambda d=disk: operation(d))
        for when in ("after the kill", "after cleanup"):
            for path in before:
                got = _state(disk, path)
                assert got in (before[path], after[path]), f"step {step}, {path}, {when}: {got}"
            disk.cleanup(max_age=0)
        leftovers = [n for n in os.listdir(root) if is_reserved(n)]
        described = [n for n in leftovers if any(n.endswith(f"-{p}.json") for p in before)]
        assert leftovers == described, f"step {step}: {leftovers}"
        for name in described:  # cleanup left one version's entry, or nothing
            assert len(read_entries(str(root / name), name)) == 1
        if done:
            assert {p: _state(disk, p) for p in before} == after
            return step
    raise AssertionError("the operation never completed")


OLD: State = (1, {"v": 1})
NEW: State = (2, {"v": 2})
CASES = {
    "metadata to metadata": (OLD, NEW),
    "metadata to none": (OLD, (2, None)),
    "none to metadata": ((1, None), NEW),
    "new file with metadata": ((None, None), NEW),
}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_killed_at_every_step(tmp_path: Path, case: str, overwrite: bool) -> None:
    before, after = CASES[case]
    if not overwrite and before[0] is not None:
        pytest.skip("overwrite=False only creates")
    value, meta = after

    def save(disk: DiskBackend) -> None:
        disk.save(np.full(3, value), "a.npy", metadata=meta, overwrite=overwrite)

    steps = _every_step(tmp_path, {"a.npy": before}, save, {"a.npy": after})
    assert steps >= 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_copy_killed_at_every_step(tmp_path: Path, case: str) -> None:
    before, after = CASES[case]
    _every_step(
        tmp_path,
        {"src.npy": after, "dst.npy": before},
        lambda disk: disk.copy("src.npy", "dst.npy"),
        {"src.npy": after, "dst.npy": after},
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_move_killed_at_every_step(tmp_path: Path, case: str) -> None:
    before, after = CASES[case]
    _every_step(
        tmp_path,
        {"src.npy": after, "sub/dst.npy": before},
        lambda disk: disk.move("src.npy", "sub/dst.npy"),
        {"src.npy": (None, None), "sub/dst.npy": after},
    )


def test_delete_killed_at_every_step(tmp_path: Path) -> None:
    _every_step(
        tmp_path, {"a.npy": OLD}, lambda disk: disk.delete("a.npy"), {"a.npy": (None, None)}
    )


def test_metadata_survives_touch(tmp_path: Path) -> None:
    # A committed sidecar describes whatever file has the name, as before.
    disk = DiskBackend(tmp_path)
    disk.save(np.ones(2), "a.npy", metadata={"k": 1})
    os.utime(tmp_path / "a.npy", (1_000_000, 1_000_000))
    assert disk.load_metadata("a.npy") == {"k": 1}


def test_a_plain_save_writes_nothing_but_the_file(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path)
    disk.save(np.ones(2), "a.npy")
    disk.save(np.ones(3), "a.npy")
    assert os.listdir(tmp_path) == ["a.npy"]
    disk.save(np.ones(3), "a.npy", metadata={"k": 1})
    disk.save(np.ones(3), "a.npy")
    assert os.listdir(tmp_path) == ["a.npy"]


def test_cleanup_settles_what_a_killed_writer_left(tmp_path: Path) -> None:
    # Killed after the sidecar named both versions: cleanup keeps the one that
    # applies, so a copy of the directory (new inodes) keeps the metadata too.
    disk = DiskBackend(tmp_path)
    _put(disk, "a.npy", OLD)
    assert not _run_killed(2, lambda: disk.save(np.full(3, 2), "a.npy", metadata={"v": 2}))
    (sidecar,) = [p for p in tmp_path.iterdir() if p.name.startswith(".polystore-meta-")]
    assert len(read_entries(str(sidecar), "a.npy")) == 2
    disk.cleanup(max_age=0)
    assert len(read_entries(str(sidecar), "a.npy")) == 1
    copy = tmp_path.parent / "copied"
    shutil.copytree(tmp_path, copy)
    assert _state(DiskBackend(copy), "a.npy") == NEW
