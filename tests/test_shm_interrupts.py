"""The store under exceptions raised by signal handlers (Ctrl-C) at any bytecode.

A Python signal handler runs between two bytecodes of the main thread, and
KeyboardInterrupt is the one every user meets. Raised between taking a lock
and the ``try`` that drops it, it would leave the store locked for good: in
this process, or, for the store's flock, in every process. A storm of
SIGALRM every 0.2 ms, each raising, runs across gets (in C, and in Python
after segments were unlinked), puts, creates and deletes, across forks made
while a view is held (the fork hooks lock the store until the child has
pinned what it inherited), across a FileManager's calls on the shared
registry's backends, and across stores being made and closed; the store
must stay usable and whole, no view that died meanwhile may keep its block
pinned, no block taken for a write may be lost to one interrupt, every child
must find its inherited view intact, and no store's file may outlive the process.
``--storm-seconds`` sets the length of each storm (1 s by default, for CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from storms import PRELUDE, run_storm

from polystore._shm import fast as _shm_fast

STORM = r"""
import os, signal, sys, time
import numpy as np
import polystore
from polystore._shm import layout as ix
from polystore._shm.check import problems

class Interrupted(Exception):
    pass

armed = False

def handler(signum, frame):
    global armed
    if armed:
        armed = mode != "once"  # "once": one exception an operation, as one Ctrl-C
        raise Interrupted

mode, seconds = sys.argv[1], float(sys.argv[2])
value = np.arange(20_000, dtype=np.float64)
signal.signal(signal.SIGALRM, handler)
# "unlink": no idle memory kept, so each delete of a large value unlinks its
# segment and the next get takes the Python path (the store changed epoch)
large = np.ones(3 << 17)
kwargs = {"cache_bytes": 0} if mode == "unlink" else {}
with polystore.SharedArrayStore(**kwargs) as store:
    for i in range(4):
        store.put(f"k{i}", value)
    interrupts = 0
    held, children = store.get("k0"), []
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    start = time.monotonic()
    while True:
        try:
            armed = True
            if time.monotonic() - start > seconds:
                armed = False
                break
            for i in range(4):
                if mode == "get":
                    view = store.get(f"k{i}")
                    del view
                elif mode == "unlink":  # each put frees a large block, whose segment goes
                    view = store.get(f"k{i}")
                    del view
                    store.put(f"large{i % 2}", large)
                elif mode == "fork":  # with a view held: the fork hook locks the store
                    pid = os.fork()
                    if pid == 0:
                        os._exit(0 if held[0] == 0 else 3)
                    children.append(pid)
                else:  # "write", and "once"
                    store.put(f"k{i}", value)
                    store.delete(f"k{i}")
                    with store.create(f"k{i}", value.shape, value.dtype) as out:
                        out[:] = value
            armed = False
        except (Interrupted, KeyError):
            armed = False
            interrupts += 1
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0, "a child did not see its view"
    held = view = out = None  # (a view left bound by an interrupted iteration)
    arena = store._arena
    assert not arena._lock.locked(), "the thread lock was left taken"
    if arena.fast is not None and arena.slot >= 0:  # (C's callback: no view keeps its pin)
        import gc
        gc.collect()
        assert arena.pins_np[arena.slot].sum() == 0, "a dead view kept its pin"
    assert problems(arena) == [], problems(arena)
    # A block taken for a put or a create goes back whatever one exception
    # interrupts (a second one landing in that clean-up may keep it until
    # the process ends: the storms above raise again every 0.2 ms).
    blk = arena.blk_np[: arena.h[ix.H_BLK_HW]]
    lost = (blk[:, ix.B_STATE] == ix.WRITING) & (blk[:, ix.B_OWNER] == arena.slot)
    assert mode != "once" or not lost.any(), f"{int(lost.sum())} blocks taken were lost"
    store.put("after", value)  # the flock is free too
    assert np.array_equal(store.get("after"), value)
    print("interrupts", interrupts)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["get", "write", "once", "unlink", "fork"])
def test_exceptions_from_signal_handlers_never_leave_the_store_locked(
    mode: str, storm_seconds: str
) -> None:
    if mode == "fork" and not _shm_fast.AVAILABLE:
        pytest.skip("without C, the fork hooks keep a bytecode boundary open")
    assert int(run_storm(STORM, mode, storm_seconds)[-1]) > 100  # the storm did interrupt


FM_STORM = (
    PRELUDE
    + r"""
import gc, sys, time
import numpy as np
import polystore
from polystore import FileManagerFactory
from polystore._shm.check import problems

value = np.arange(20_000, dtype=np.float64)
with polystore.shared_registry() as registry:
    fm = FileManagerFactory(registry)()
    interrupts, i, skip = 0, 0, False
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    start = time.monotonic()
    while time.monotonic() - start < float(sys.argv[1]):
        try:
            armed, skip = not skip, False
            i += 1
            for backend in ("memory", "shm"):
                fm.save(value, f"d/{i % 3}.npy", backend=backend, metadata={"i": i})
                with fm.create_array(f"e/{i % 3}.npy", value.shape, value.dtype,
                                     backend=backend) as out:
                    out[:] = value
                for _ in range(12):  # (loads, where a pin and its watch once came apart)
                    view = fm.load(f"d/{i % 3}.npy", backend=backend)
                fm.list_files("d", backend=backend)
                fm.delete(f"e/{i % 3}.npy", backend=backend)
            armed = False
        except Interrupted:
            armed, skip = False, True
            interrupts += 1
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    view = out = None  # (left bound by an interrupted iteration)
    gc.collect()
    for backend in ("memory", "shm"):
        for path in fm.list_files("d", backend=backend):
            assert np.array_equal(fm.load(path, backend=backend), value)
    for store in {registry["memory"].array_store, registry["shm"].array_store}:
        arena = store._arena
        assert not arena._lock.locked(), "the thread lock was left taken"
        if arena.slot >= 0:
            assert arena.pins_np[arena.slot].sum() == 0, "a dead view kept its pin"
        assert problems(arena) == [], problems(arena)
    print("interrupts", interrupts)
"""
)


@pytest.mark.timeout(90)
def test_interrupts_across_the_filemanager_leave_no_lock_and_no_pin(storm_seconds: str) -> None:
    # Saves (a file and its metadata), blocks made in place, loads, listings
    # and deletes on the memory and shm backends of a shared registry.
    if not _shm_fast.AVAILABLE:
        pytest.skip("without C, a bytecode boundary stays open between a pin and its watch")
    assert int(run_storm(FM_STORM, storm_seconds)[-1]) > 100  # the storm did interrupt


LIFE_STORM = (
    PRELUDE
    + r"""
import sys, time
import numpy as np
import polystore

directory, seconds = sys.argv[1], float(sys.argv[2])
interrupts, skip = 0, False
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
start = time.monotonic()
while time.monotonic() - start < seconds:
    try:
        armed, skip = not skip, False
        with polystore.SharedArrayStore(directory=directory) as store:
            store.put("a", np.arange(1000.0))
        armed = False
    except Interrupted:
        armed, skip = False, True
        interrupts += 1
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print("interrupts", interrupts)
"""
)


@pytest.mark.timeout(90)
def test_stores_made_and_closed_under_interrupts_leave_no_file_once_the_process_ends(
    tmp_path: Path, storm_seconds: str
) -> None:
    # A store is noted before its control file exists and forgotten once all
    # its files are gone: a creation or a close cut short by an exception
    # leaves its files to the exit of the process at worst.
    interrupts = int(run_storm(LIFE_STORM, str(tmp_path), storm_seconds)[-1])
    assert interrupts > 20  # the storm did interrupt (a store takes ms)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
