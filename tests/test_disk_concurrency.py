"""The disk backend and its locks across processes started with spawn.

Workers are module-level functions so spawned children can import them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest
from storms import PRELUDE, run_storm

from polystore.disk import DiskBackend
from polystore.exceptions import LockTimeoutError
from polystore.locks import atomic_update_json, file_lock

pytestmark = pytest.mark.multiprocess

SPAWN = multiprocessing.get_context("spawn")
BIG = 2_000_000  # float64 elements: a 16 MB file takes a while to write


def start(target: object, *args: object) -> multiprocessing.process.BaseProcess:
    proc = SPAWN.Process(target=target, args=args)  # type: ignore[attr-defined]
    proc.start()
    return proc


def finish(procs: list[multiprocessing.process.BaseProcess], timeout: float = 60) -> None:
    for proc in procs:
        proc.join(timeout)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)


# -- workers ------------------------------------------------------------------------------


def _increment(n: int) -> int:
    return n + 1


def count_worker(path: str, times: int) -> None:
    for _ in range(times):
        atomic_update_json(path, _increment, default=0)


def hold_lock_worker(path: str, taken: Event) -> None:
    with file_lock(path):
        taken.set()
        time.sleep(600)  # until killed


def overwrite_worker(root: str, started: Event) -> None:
    backend = DiskBackend(root=root)
    arrays = [np.full(BIG, 1.0), np.full(BIG, 2.0)]
    i = 0
    while True:
        backend.save(arrays[i % 2], "d/big.npy")
        started.set()
        i += 1


def metadata_worker(backend: DiskBackend, worker: int, count: int) -> None:
    for k in range(count):
        meta = {"worker": worker, "k": k, "tags": [f"w{worker}", k * 0.5], "ok": True}
        backend.save(np.full(10, worker * 100 + k), f"out/w{worker}-{k:02d}.npy", metadata=meta)


def exclusive_worker(backend: DiskBackend, worker: int, results: str) -> None:
    try:
        backend.save(np.full(1000, worker), "once.npy", overwrite=False)
        outcome = "won"
    except FileExistsError:
        outcome = "lost"
    atomic_update_json(results, lambda r: [*r, [worker, outcome]], default=[])


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_four_processes_lose_no_increment(tmp_path: Path) -> None:
    counter = str(tmp_path / "counter.json")
    procs = [start(count_worker, counter, 50) for _ in range(4)]
    finish(procs)
    assert json.loads(Path(counter).read_text()) == 200
    assert os.listdir(tmp_path) == ["counter.json"]


@pytest.mark.timeout(60)
def test_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path) -> None:
    target = str(tmp_path / "shared.json")
    taken = SPAWN.Event()
    holder = start(hold_lock_worker, target, taken)
    try:
        assert taken.wait(30)
        with pytest.raises(LockTimeoutError), file_lock(target, timeout=0.2):
            pass
    finally:
        holder.kill()
        holder.join(30)
    # The kernel dropped the dead holder's lock; only its lock file is left.
    with file_lock(target, timeout=30):
        pass
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_killed_writer_never_leaves_a_torn_file(tmp_path: Path) -> None:
    backend = DiskBackend(root=tmp_path)
    old, new = np.full(BIG, 1.0), np.full(BIG, 2.0)
    backend.save(old, "d/big.npy")
    for delay in (0.0, 0.003, 0.011, 0.025, 0.047):
        started = SPAWN.Event()
        writer = start(overwrite_worker, str(tmp_path), started)
        try:
            assert started.wait(60)
            time.sleep(delay)
        finally:
            writer.kill()
            writer.join(30)
        loaded = backend.load("d/big.npy")
        assert np.array_equal(loaded, old) or np.array_equal(loaded, new)
        assert backend.list_dir("d") == ["big.npy"]
        assert backend.list_files(".", recursive=True) == ["./d/big.npy"]
    # Killed writers' temporary files are gone once cleaned (their pids are dead).
    backend.cleanup(max_age=0)
    assert sorted(os.listdir(tmp_path / "d")) == ["big.npy"]


@pytest.mark.timeout(120)
def test_metadata_from_many_processes_is_all_kept(tmp_path: Path) -> None:
    backend = DiskBackend(root=tmp_path)
    procs = [start(metadata_worker, backend, w, 10) for w in range(4)]
    finish(procs)
    files = backend.list_files("out")
    assert files == sorted(f"out/w{w}-{k:02d}.npy" for w in range(4) for k in range(10))
    for w in range(4):
        for k in range(10):
            path = f"out/w{w}-{k:02d}.npy"
            assert backend.load_metadata(path) == {
                "worker": w,
                "k": k,
                "tags": [f"w{w}", k * 0.5],
                "ok": True,
            }
            assert np.array_equal(backend.load(path), np.full(10, w * 100 + k))


@pytest.mark.timeout(120)
def test_overwrite_false_has_one_winner_among_processes(tmp_path: Path) -> None:
    backend = DiskBackend(root=tmp_path)
    results = str(tmp_path / "results.json")
    procs = [start(exclusive_worker, backend, w, results) for w in range(4)]
    finish(procs)
    outcomes = json.loads(Path(results).read_text())
    winners = [w for w, outcome in outcomes if outcome == "won"]
    assert len(outcomes) == 4 and len(winners) == 1
    assert np.array_equal(backend.load("once.npy"), np.full(1000, winners[0]))


# A SIGALRM handler that raises every 0.2 ms (Ctrl-C's KeyboardInterrupt can
# land between any two bytecodes) across saves, loads and file locks, every
# other iteration after an interrupt (so that saves also finish): no lock may
# be left taken (another process takes each at once), the file must hold one
# of the values saved, whole, with that save's metadata, and few interrupted
# writes may leave their temporary file (one interrupted in its own clean-up).
STORM = (
    PRELUDE
    + r"""
import os, signal, sys, time
import numpy as np
from polystore import DiskBackend, file_lock


root, seconds = sys.argv[1], float(sys.argv[2])
backend = DiskBackend(root=root)
interrupts, saved, i, skip = 0, 0, 0, False
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
start = time.monotonic()
while time.monotonic() - start < seconds:
    try:
        armed, skip = not skip, False
        i += 1
        backend.save(np.full(1000, float(i % 2)), "d/a.npy", metadata={"i": i})
        saved += 1
        backend.load("d/a.npy")
        with file_lock(os.path.join(root, "x")):
            pass
        armed = False
    # (numpy's tofile() turns an exception raised inside it into a TypeError)
    except (Interrupted, TypeError):
        armed, skip = False, True
        interrupts += 1
signal.setitimer(signal.ITIMER_REAL, 0, 0)
left = sum(name.startswith(".polystore-tmp-") for name in os.listdir(os.path.join(root, "d")))
print(interrupts, saved, left)
"""
)


@pytest.mark.timeout(90)
def test_exceptions_from_signal_handlers_leave_no_lock_taken(
    tmp_path: Path, storm_seconds: str
) -> None:
    interrupts, saved, left = map(int, run_storm(STORM, str(tmp_path), storm_seconds))
    assert interrupts > 100 and saved > 10  # the storm interrupted, and saves finished
    assert left <= interrupts // 5, (left, interrupts)  # (it was over half before)
    backend = DiskBackend(root=tmp_path, lock_timeout=5)
    with file_lock(tmp_path / "x", timeout=5):
        pass
    value = backend.load("d/a.npy")
    assert value.shape == (1000,) and (value == value[0]).all()
    assert value[0] == backend.load_metadata("d/a.npy")["i"] % 2  # the file's own metadata
    backend.save(np.arange(3.0), "d/a.npy")  # the directory's commit lock is free too
    assert np.array_equal(backend.load("d/a.npy"), np.arange(3.0))
