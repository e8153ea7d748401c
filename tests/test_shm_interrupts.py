"""The store under exceptions raised by signal handlers (Ctrl-C) at any bytecode.

A Python signal handler runs between two bytecodes of the main thread, and
KeyboardInterrupt is the one every user meets. Raised between taking a lock
and the ``try`` that drops it, it would leave the store locked for good: in
this process, or, for the store's flock, in every process. A storm of
SIGALRM every 0.2 ms, each raising, runs across gets, puts and deletes;
the store must stay usable and whole, and no view that died meanwhile may
keep its block pinned.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

STORM = r"""
import signal, sys, time
import numpy as np
import polystore
from polystore._shm.check import problems

class Interrupted(Exception):
    pass

armed = False

def handler(signum, frame):
    if armed:
        raise Interrupted

mode, seconds = sys.argv[1], float(sys.argv[2])
value = np.arange(20_000, dtype=np.float64)
signal.signal(signal.SIGALRM, handler)
with polystore.SharedArrayStore() as store:
    for i in range(4):
        store.put(f"k{i}", value)
    interrupts = 0
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
                else:
                    store.put(f"k{i}", value)
                    store.delete(f"k{i}")
                    store.put(f"k{i}", value)
            armed = False
        except (Interrupted, KeyError):
            armed = False
            interrupts += 1
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    arena = store._arena
    assert not arena._lock.locked(), "the thread lock was left taken"
    if arena.fast is not None and arena.slot >= 0:  # (C's callback: no view keeps its pin)
        import gc
        gc.collect()
        assert arena.pins_np[arena.slot].sum() == 0, "a dead view kept its pin"
    assert problems(arena) == [], problems(arena)
    store.put("after", value)  # the flock is free too
    assert np.array_equal(store.get("after"), value)
    print("interrupts", interrupts)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["get", "write"])
def test_exceptions_from_signal_handlers_never_leave_the_store_locked(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", STORM, mode, "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 100  # the storm did interrupt
