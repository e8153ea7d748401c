"""Stores in a directory of one's choice, and stores whose file system fills up.

A full file system must give ``ShmFullError``, never SIGBUS: every page the
store touches is reserved first. The real test mounts a small tmpfs (skipped
where this process may not mount one) and fills it from a child process, so
that a SIGBUS would show as the child's exit status.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from polystore import SharedArrayStore, ShmFullError
from polystore._shm import layout as ix
from polystore._shm.check import problems
from polystore.exceptions import StoreNotFoundError

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


def _names(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(ix.PREFIX))


def test_a_store_lives_in_the_directory_it_is_given(tmp_path: Path) -> None:
    with SharedArrayStore("in_dir", directory=tmp_path) as store:
        assert store.directory == str(tmp_path)
        store.put("a", np.arange(10))
        store.put("big", np.ones(300_000))
        assert _names(tmp_path) and not any(n.startswith(f"{ix.PREFIX}{os.getpid()}-in_dir.")
                                            for n in os.listdir(ix.SHM_DIR))  # fmt: skip
        other = SharedArrayStore.attach("in_dir", directory=tmp_path)
        assert np.array_equal(other.get("a"), np.arange(10))
        copy = pickle.loads(pickle.dumps(store))  # the directory travels with the name
        assert copy.directory == str(tmp_path) and copy.get("big").sum() == 300_000
        with pytest.raises(StoreNotFoundError, match="no shared array store named 'in_dir'"):
            SharedArrayStore.attach("in_dir")  # not in /dev/shm
        other.close()
        copy.close()
    assert _names(tmp_path) == []


def test_the_environment_names_the_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ix.DIR_ENV, str(tmp_path))
    with SharedArrayStore() as store:
        store.put("a", np.ones(3))
        assert store.directory == str(tmp_path) and _names(tmp_path)
        assert SharedArrayStore.attach(store.name).directory == str(tmp_path)
    assert _names(tmp_path) == []


def test_a_directory_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a directory"):
        SharedArrayStore(directory=tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        SharedArrayStore(directory=tmp_path / "file")
    with pytest.raises(TypeError):
        SharedArrayStore(directory=3)  # type: ignore[arg-type]


def test_ls_and_gc_take_the_directory(tmp_path: Path) -> None:
    with SharedArrayStore("cli_dir", directory=tmp_path) as store:
        store.put("a", np.ones(1000))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
        for args in (["ls", "--directory", str(tmp_path)], ["ls"]):
            out = subprocess.run(
                [sys.executable, "-m", "polystore", *args],
                capture_output=True, text=True, env={**env, ix.DIR_ENV: ""}, timeout=60,
                check=True,
            ).stdout  # fmt: skip
            assert ("cli_dir" in out) == (len(args) > 1), out
        out = subprocess.run(
            [sys.executable, "-m", "polystore", "gc", "--directory", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "kept cli_dir" in out and "removed" not in out  # a live store is never removed
        assert store.get("a").sum() == 1000


# -- a full file system ---------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs of our own (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill_up(directory: str) -> None:
    """Take every free byte of the file system with a file of its own."""
    with open(os.path.join(directory, "filler"), "wb") as f:
        chunk = b"\1" * (1 << 16)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass  # ENOSPC: full


def _fill(directory: str, small_keys: bool) -> None:  # pragma: no cover - child
    store = SharedArrayStore(directory=directory, max_keys=4096, max_blocks=16384)
    if small_keys:
        # Blocks for 600 small values, all under one key (each put retires the
        # block a held view pins): then the file system fills up from outside,
        # and new keys need only new pages of the control segment's tables.
        held = []
        for i in range(600):
            store.put("v", np.full(4, i))
            held.append(store.get("v"))
        del held
        _fill_up(directory)
        with pytest.raises(ShmFullError):
            for i in range(600):
                store.put(f"small{i}", np.full(4, i))
        os.unlink(os.path.join(directory, "filler"))
    else:
        with pytest.raises(ShmFullError):  # large values until the file system is full
            for i in range(200):
                store.put(f"big{i}", np.full(1 << 17, i, np.int64))  # 1 MiB
    assert not problems(store._arena)
    for key in store.keys()[:4]:
        store.delete(key)
    store.put("again", np.ones(1 << 16))  # room again after deleting
    assert store.get("again").sum() == 1 << 16
    assert not problems(store._arena)
    store.close()


@pytest.mark.parametrize("small_keys", [False, True], ids=["large values", "many small keys"])
def test_a_full_tmpfs_raises_shm_full_never_sigbus(small_tmpfs: Path, small_keys: bool) -> None:
    child = mp.get_context("fork").Process(target=_fill, args=(str(small_tmpfs), small_keys))
    child.start()
    child.join(90)
    assert child.exitcode != -signal.SIGBUS, "the store touched a page it had not reserved"
    assert child.exitcode == 0
    assert _names(small_tmpfs) == []


def test_a_store_that_does_not_fit_is_refused_whole(small_tmpfs: Path) -> None:
    with pytest.raises(ShmFullError):
        SharedArrayStore(directory=small_tmpfs, max_keys=1 << 20)  # tables of 16 MiB and more
    assert _names(small_tmpfs) == []


def test_max_bytes_is_a_full_store_too() -> None:
    with SharedArrayStore(max_bytes=8 << 20) as store:
        stored = 0
        with pytest.raises(ShmFullError):
            for i in range(100):
                store.put(f"k{i}", np.ones(1 << 17))
                stored += 1
        assert 0 < stored < 100
        assert store.stats()["mapped_bytes"] <= 8 << 20
        store.delete("k0")
        store.put("k0", np.ones(1 << 17))
        assert not problems(store._arena)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to leave a file of another user")
def test_another_users_store_neither_blocks_the_name_nor_is_attached(tmp_path: Path) -> None:
    foreign = tmp_path / f"{ix.PREFIX}1-shared_name.ctl"
    foreign.write_bytes(b"\0" * 4096)
    os.chown(foreign, 65534, 65534)
    foreign.chmod(0o600)
    with pytest.raises(Exception, match="belongs to another user"):
        SharedArrayStore.attach("shared_name", directory=tmp_path)
    with SharedArrayStore("shared_name", directory=tmp_path) as store:  # the name is free
        store.put("a", np.ones(2))
        assert SharedArrayStore.attach("shared_name", directory=tmp_path).get("a").sum() == 2
    foreign.unlink()
