"""What the first ``get`` after a large hand-off costs, taken apart.

Run: ``python benchmarks/cold_get.py`` (about 10 seconds; ``--help`` for the
options). Needs the C fast path (``polystore._shm.fast.ENABLED``).

``exchange.py`` times the first ``get`` in the consumer right after the
producer copied a large array: the copy has flushed the caches both cores
share, so whatever the consumer runs first runs from memory. This script
makes the same hand-offs (float32, 64 MB by default) and, in turn, times
one of these as the consumer's first step after each:

* ``abs(-1)``: a call that does nothing, what waking up alone costs;
* a bare ``np.frombuffer`` of memory mapped long ago: the least a zero-copy
  ``get`` must do to return a view (the *floor* of ``exchange.py``);
* the C lookup and pin of the key in the store's shared index, without a
  view: the least a ``get`` must do so that a later overwrite cannot change
  what it returns;
* that lookup and pin followed by a bare ``np.frombuffer``;
* ``SharedArrayStore.get``: lookup, pin and view in one call.

The modes take turns from one hand-off to the next, so they share the
machine's state; medians are printed.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import statistics
import time
from typing import Any

import numpy as np

from polystore import SharedArrayStore
from polystore._shm import fast as _shm_fast
from polystore._shm.keys import key_parts

MODES = {
    "noop": "abs(-1): a call that does nothing",
    "floor": "bare np.frombuffer of a mapped buffer",
    "pin": "lookup and pin in the shared index (C), no view",
    "pin+floor": "lookup and pin, then a bare np.frombuffer",
    "get": "SharedArrayStore.get: lookup, pin and view (C)",
}


def consumer(store: SharedArrayStore, nbytes: int, conn: Any) -> None:
    store.get("x")  # a row in the pin table, the value's description cached
    arena = store._arena
    fast = arena.fast
    _, kbz, h = key_parts("x")
    buf = mmap.mmap(-1, nbytes)
    count = nbytes // 4
    names = list(MODES)
    samples: dict[str, list[float]] = {m: [] for m in names}
    i = 0
    while conn.recv() is not None:
        mode = names[i % len(names)]
        i += 1
        pinned = None
        start = time.perf_counter()
        if mode == "noop":
            got: Any = abs(-1)
        elif mode == "floor":
            got = np.frombuffer(buf, np.float32, count, 0)
        elif mode == "pin":
            got = pinned = fast.get(arena, kbz, h)
        elif mode == "pin+floor":
            pinned = fast.get(arena, kbz, h)
            got = np.frombuffer(buf, np.float32, count, 0)
        else:
            got = store.get("x")
        samples[mode].append(time.perf_counter() - start)
        if isinstance(pinned, tuple):
            arena.unpin(pinned[1])
        del got, pinned
        conn.send(i)
    conn.send({m: statistics.median(v) for m, v in samples.items() if v})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="array size in MB")
    parser.add_argument("--rounds", type=int, default=40, help="hand-offs per mode")
    args = parser.parse_args(argv)
    if not _shm_fast.ENABLED:
        print("the C fast path is not built or is turned off: nothing to take apart")
        return 1
    nbytes = args.size_mb << 20
    ctx = multiprocessing.get_context("spawn")
    with SharedArrayStore() as store:
        arr = np.ones(nbytes // 4, np.float32)
        store.put("x", arr)
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=consumer, args=(store, nbytes, theirs))
        proc.start()
        try:
            for _ in range(args.rounds * len(MODES)):
                store.put("x", arr)  # the copy that flushes the caches
                ours.send(1)
                ours.recv()
        finally:
            ours.send(None)
            medians = ours.recv()
            proc.join()
    print(f"first step of the consumer after a {args.size_mb} MB hand-off (median)")
    for mode, what in MODES.items():
        print(f"  {medians[mode] * 1e6:7.1f} us  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
