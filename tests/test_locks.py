"""file_lock and atomic_update_json within one process (threads hold separate locks)."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest

from polystore import locks
from polystore.exceptions import LockTimeoutError, StorageError, UnsupportedFormatError
from polystore.locks import (
    LOCK_PREFIX,
    TEMP_PREFIX,
    atomic_update_json,
    file_lock,
    lock_path,
    remove_stale,
)


def hold_in_thread(path: Path, shared: bool = False) -> tuple[threading.Event, threading.Thread]:
    """Take the lock in another thread; set the returned event to let it go."""
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with file_lock(path, shared=shared):
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert taken.wait(30)
    return release, thread


def test_lock_file_is_a_hidden_sibling_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.json"
    with file_lock(target) as held:
        assert held == str(tmp_path / "sub" / f"{LOCK_PREFIX}data.json")
        assert os.path.isfile(held)
        assert not target.exists()
    assert os.listdir(tmp_path / "sub") == []


def test_timeout_names_the_path_and_pickles(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    release, thread = hold_in_thread(target)
    try:
        with pytest.raises(LockTimeoutError) as info, file_lock(target, timeout=0.05):
            pass
    finally:
        release.set()
        thread.join()
    error = info.value
    assert isinstance(error, TimeoutError) and isinstance(error, StorageError)
    assert error.path == str(target) and error.timeout == 0.05
    assert str(target) in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert (type(clone), clone.path, clone.timeout, str(clone)) == (
        LockTimeoutError,
        error.path,
        error.timeout,
        str(error),
    )
    with file_lock(target, timeout=0):
        pass


def test_shared_locks_coexist_and_keep_writers_out(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    release, thread = hold_in_thread(target, shared=True)
    try:
        with file_lock(target, shared=True, timeout=0):
            pass
        with pytest.raises(LockTimeoutError), file_lock(target, timeout=0.05):
            pass
    finally:
        release.set()
        thread.join()
    with file_lock(target, timeout=0):
        pass
    assert os.listdir(tmp_path) == []


def test_waiter_gets_the_lock_after_the_file_is_removed(tmp_path: Path) -> None:
    # The holder removes the lock file on release while a waiter is blocked on
    # it; the waiter must notice and lock the new file, and never share the lock.
    target = tmp_path / "a.json"
    inside = 0
    overlap = []

    def worker() -> None:
        nonlocal inside
        for _ in range(200):
            with file_lock(target):
                inside += 1
                if inside != 1:
                    overlap.append(inside)
                time.sleep(0)
                inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == []
    assert os.listdir(tmp_path) == []


def test_bad_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError), file_lock(tmp_path / "a", timeout=-1):
        pass
    with pytest.raises(ValueError), file_lock(tmp_path / "/"):
        pass


def test_long_names_are_hashed(tmp_path: Path) -> None:
    name = "x" * 250
    lock = lock_path(tmp_path / name)
    assert os.path.basename(lock).startswith(LOCK_PREFIX)
    assert len(os.path.basename(lock)) <= 255
    with file_lock(tmp_path / name):
        pass


# -- atomic_update_json ----------------------------------------------------------------


def test_update_starts_from_a_copy_of_default(tmp_path: Path) -> None:
    target = tmp_path / "counts.json"
    default: dict[str, int] = {}

    def bump(counts: dict[str, int]) -> dict[str, int]:
        counts["n"] = counts.get("n", 0) + 1
        return counts

    assert atomic_update_json(target, bump, default=default) == {"n": 1}
    assert atomic_update_json(target, bump, default=default) == {"n": 2}
    assert default == {}
    assert json.loads(target.read_text()) == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["counts.json"]


def test_failed_update_leaves_the_file(tmp_path: Path) -> None:
    target = tmp_path / "v.json"
    atomic_update_json(target, lambda _: [1], default=None)

    def broken(value: object) -> object:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        atomic_update_json(target, broken)
    with pytest.raises(UnsupportedFormatError):
        atomic_update_json(target, lambda _: {"bad": object()})
    assert json.loads(target.read_text()) == [1]
    assert sorted(os.listdir(tmp_path)) == ["v.json"]


def test_threads_lose_no_update(tmp_path: Path) -> None:
    target = tmp_path / "n.json"

    def worker() -> None:
        for _ in range(25):
            atomic_update_json(target, lambda n: n + 1, default=0)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(target.read_text()) == 100


# -- leftovers ----------------------------------------------------------------------------


def test_remove_stale_spares_live_writers_and_held_locks(tmp_path: Path) -> None:
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-aa"
    unknown = tmp_path / f"{TEMP_PREFIX}nopid-aa"
    orphan_lock = tmp_path / f"{LOCK_PREFIX}left.json"
    for path in (mine, unknown, orphan_lock):
        path.write_bytes(b"")
    release, thread = hold_in_thread(tmp_path / "held.json")
    try:
        removed = remove_stale(str(tmp_path), max_age=0)
        assert removed == sorted([unknown.name, orphan_lock.name])
        assert sorted(os.listdir(tmp_path)) == sorted([mine.name, f"{LOCK_PREFIX}held.json"])
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("where", ["directory", "lock file"])
def test_directory_lock_excludes_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "lock file":
        # as on a file system that cannot lock a directory (NFS)
        monkeypatch.setattr(locks, "_lock_directory", lambda directory, timeout: None)
    with locks.directory_lock(str(tmp_path), 1.0):
        second = locks.directory_lock(str(tmp_path), 0.0)
        with pytest.raises(LockTimeoutError):
            second.__enter__()
    with locks.directory_lock(str(tmp_path), 0.0):
        pass
    assert os.listdir(tmp_path) == []
