"""Spill: values that do not fit in shared memory go to a file-backed mapping on disk."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import polystore
from polystore import SharedArrayStore, ShmFullError
from polystore._shm import layout as ix
from polystore._shm.check import problems

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("store_paths")]

REPO = Path(__file__).resolve().parent.parent


def _spilled_files(spill: Path) -> list[str]:
    return sorted(n for n in os.listdir(spill) if n.startswith(ix.PREFIX))


def _read_sum(store: SharedArrayStore, key: str) -> None:  # pragma: no cover - child
    view = store.get(key)
    ok = not view.flags.writeable and view.base is not None and float(view.sum()) == 2.0 * view.size
    del view
    store.close()
    os._exit(0 if ok else 1)


def test_a_value_larger_than_shared_memory_is_spilled_and_read_in_place(tmp_path: Path) -> None:
    with SharedArrayStore(max_bytes=4 << 20, spill_dir=tmp_path) as store:
        assert store.spill_dir == str(tmp_path)
        store.put("small", np.ones(1000))
        store.put("big", np.full(1 << 20, 2.0))  # 8 MiB > max_bytes: spilled
        stats = store.stats()
        assert stats["spilled_bytes"] >= 8 << 20 and stats["mapped_bytes"] <= 4 << 20
        assert _spilled_files(tmp_path)
        view = store.get("big")
        assert view.sum() == 2.0 * (1 << 20) and not view.flags.owndata  # a view, no copy
        child = mp.get_context("fork").Process(target=_read_sum, args=(store, "big"))
        child.start()
        child.join(30)
        assert child.exitcode == 0  # another process sees it, in place too
        del view
        with store.create("made", 1 << 20, np.float64) as out:  # in place, spilled too
            out[:] = 3
        assert store.get("made").sum() == 3.0 * (1 << 20)
        assert not problems(store._arena)
        del out  # the writer's array holds its block like a view
        store.delete("big")
        store.delete("made")
        assert store.stats()["spilled_bytes"] == 0 and _spilled_files(tmp_path) == []
        store.put("big", np.full(1 << 20, 2.0))
        assert _spilled_files(tmp_path)
    assert _spilled_files(tmp_path) == []  # removed with the store


def test_without_a_spill_directory_it_is_a_full_store(tmp_path: Path) -> None:
    with SharedArrayStore(max_bytes=4 << 20) as store, pytest.raises(ShmFullError):
        store.put("big", np.full(1 << 20, 2.0))
    with pytest.raises(NotADirectoryError):
        SharedArrayStore(spill_dir=tmp_path / "missing")


def test_a_full_spill_directory_is_a_full_store(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with SharedArrayStore(max_bytes=2 << 20, spill_dir=mnt) as store:
            with pytest.raises(ShmFullError, match="spill"):
                store.put("big", np.ones(1 << 20))  # 8 MiB: fits neither
            assert not problems(store._arena)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_shared_registry_spills_and_ls_shows_it(tmp_path: Path) -> None:
    with polystore.shared_registry(max_bytes=2 << 20, spill_dir=tmp_path) as registry:
        fm = polystore.FileManager(registry)
        fm.save(np.full(1 << 19, 5.0), "big.npy", backend="shm")  # 4 MiB
        assert (fm.load("big.npy", backend="shm") == 5).all()
        name = registry["shm"].array_store.name
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
        out = subprocess.run(
            [sys.executable, "-m", "polystore", "ls", name],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "SPILLED" in out.splitlines()[0]
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert row.split()[-1] == "MB" and float(row.split()[-2]) >= 4.0
    assert _spilled_files(tmp_path) == []


def test_gc_removes_what_a_dead_owner_spilled(tmp_path: Path) -> None:
    code = (
        "import os, signal, numpy as np\n"
        "from polystore import SharedArrayStore\n"
        f"s = SharedArrayStore('spill_gc', max_bytes=1 << 20, spill_dir={str(tmp_path)!r})\n"
        "s.put('big', np.ones(1 << 20))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _spilled_files(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "polystore", "gc", "spill_gc"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "removed spill_gc" in out
    assert _spilled_files(tmp_path) == []
