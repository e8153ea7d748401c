"""Arrays between Dask workers of one machine: plain Dask against polystore.dask.

Run: ``python benchmarks/dask_exchange.py`` (``--quick`` for small sizes,
``--help`` for the options). Needs ``distributed``; Linux (it reads
``/proc/<pid>/smaps_rollup``).

On a ``LocalCluster`` of 2 and then 4 worker processes (one thread each,
127.0.0.1, no dashboard), side by side in one run:

1. **Broadcast**: one array of each size reaches every worker, and a task on
   each worker reads all of it (a sum), so that every page is touched.
   ``client.scatter(array, broadcast=True)`` against
   ``polystore.dask.share(client, array)``. Reported: wall time from the call
   to the last task's end, and the memory the broadcast added, as the growth
   of the summed PSS (proportional set size: a page mapped by N processes
   counts 1/N in each) of the client and all workers, in copies of the array.
   The client's own array is made before the baseline, so it is not counted.
2. **Hand-off**: a chain of tasks, each on the other worker than the one
   before, each receiving the previous array and returning a new one
   (``x + 1``). Plain Dask results against ``@polystore.dask.shared_result``
   (the task makes its array, which is then copied into shared memory) and
   against ``polystore.dask.result_array`` (the task computes straight into
   shared memory). The same chain run on one worker with plain results (no
   transfer) is the compute floor; time per hand-off is (chain - floor) /
   hand-offs.

Every figure is the median of ``--repeat`` runs; ratios are Dask / polystore.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import polystore.dask as psd

MB = 1 << 20


def pss(pid: int) -> int:
    """Proportional set size of a process, in bytes."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line for pid {pid}")


def touch(value: Any) -> float:
    array = value.get() if isinstance(value, psd.SharedArray) else value
    return float(array.sum(dtype=np.float64))


def step(value: Any) -> np.ndarray[Any, Any]:
    array = value.get() if isinstance(value, psd.SharedArray) else value
    return np.add(array, 1, dtype=array.dtype)


shared_step = psd.shared_result(step)


def seed(nbytes: int) -> np.ndarray[Any, Any]:
    return np.ones(nbytes // 4, dtype=np.float32)


shared_seed = psd.shared_result(seed)


def step_in_place(value: Any) -> psd.SharedArray:
    source = value.get() if isinstance(value, psd.SharedArray) else value
    with psd.result_array(source.shape, source.dtype) as out:
        np.add(source, 1, out=out.array)
    return out.handle


def seed_in_place(nbytes: int) -> psd.SharedArray:
    with psd.result_array(nbytes // 4, np.float32) as out:
        out.array.fill(1)
    return out.handle


def total_pss(client: Any) -> int:
    pids = client.run(os.getpid).values()
    return pss(os.getpid()) + sum(pss(p) for p in pids)


def broadcast(client: Any, array: np.ndarray[Any, Any], how: str) -> tuple[float, float]:
    """(seconds, copies of the array added) for one broadcast, then cleans up."""
    workers = sorted(client.scheduler_info()["workers"])
    psd.install(client)  # the store and its worker plugin, outside the timing
    gc.collect()
    before = total_pss(client)
    start = time.perf_counter()
    value: Any = (
        client.scatter(array, broadcast=True) if how == "dask" else psd.share(client, array)
    )
    sums = [client.submit(touch, value, workers=[w], pure=False) for w in workers]
    client.gather(sums)
    seconds = time.perf_counter() - start
    copies = (total_pss(client) - before) / array.nbytes
    if how == "dask":
        client.cancel(value)
    else:
        value.release()
    del value, sums
    psd.close(client)  # the store goes with its segments: each run starts cold
    return seconds, copies


def chain(client: Any, nbytes: int, links: int, how: str) -> float:
    """Seconds for a chain of ``links`` hand-offs (``one``, ``in place one``: on one worker)."""
    workers = sorted(client.scheduler_info()["workers"])
    psd.install(client)
    first_step, next_step = {
        "polystore": (shared_seed, shared_step),
        "in place": (seed_in_place, step_in_place),
        "in place one": (seed_in_place, step_in_place),
    }.get(how, (seed, step))
    start = time.perf_counter()
    value = client.submit(first_step, nbytes, workers=[workers[0]], pure=False)
    for i in range(links):
        where = workers[0] if how.endswith("one") else workers[(i + 1) % 2]
        value = client.submit(next_step, value, workers=[where], pure=False)
    client.submit(touch, value, workers=[workers[0]], pure=False).result()
    seconds = time.perf_counter() - start
    del value
    return seconds


def median(runs: int, measure: Callable[[], Any]) -> Any:
    results = [measure() for _ in range(runs)]
    if isinstance(results[0], tuple):
        return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))
    return statistics.median(results)


def run_cluster(workers: int, args: argparse.Namespace) -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # any free port: clusters run side by side
            worker_dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        print(f"\n{workers} worker processes")
        print(f"  broadcast    {'dask s':>8} {'ours s':>8} {'time x':>7}   {'dask mem':>8} "
              f"{'ours mem':>8} {'mem x':>6}   (mem in copies of the array)")  # fmt: skip
        for size in args.broadcast_mb:
            array = np.ones(size * MB // 4, dtype=np.float32)
            dask_s, dask_m = median(args.repeat, lambda a=array: broadcast(client, a, "dask"))
            ours_s, ours_m = median(args.repeat, lambda a=array: broadcast(client, a, "ours"))
            print(f"  {size:>6} MB    {dask_s:8.3f} {ours_s:8.3f} {dask_s / ours_s:7.1f}   "
                  f"{dask_m:8.2f} {ours_m:8.2f} {dask_m / max(ours_m, 1e-9):6.1f}")  # fmt: skip
            del array
        nbytes = args.handoff_mb * MB
        links = args.links
        floor = median(args.repeat, lambda: chain(client, nbytes, links, "one"))
        dask = median(args.repeat, lambda: chain(client, nbytes, links, "dask"))
        ours = median(args.repeat, lambda: chain(client, nbytes, links, "polystore"))
        inplace = median(args.repeat, lambda: chain(client, nbytes, links, "in place"))
        # Computing in place has a floor of its own: the same chain on one
        # worker, in recycled shared memory (no fresh private pages per step).
        floor_inplace = median(args.repeat, lambda: chain(client, nbytes, links, "in place one"))
        per_dask = max(dask - floor, 0.0) / links
        print(f"  hand-off of {args.handoff_mb} MB, chain of {links}: compute floor "
              f"{floor:.3f} s ({floor_inplace:.3f} s in place); per hand-off: Dask "
              f"{per_dask * 1e3:.1f} ms")  # fmt: skip
        for label, total, base in (
            ("shared_result", ours, floor),
            ("result_array (in place)", inplace, floor_inplace),
        ):
            per = (total - base) / links
            ratio = f"{per_dask / per:.1f}x" if per > 0 else "faster than the floor"
            print(f"    polystore {label}: {per * 1e3:.1f} ms, {total:.3f} s in all; "
                  f"Dask / polystore {ratio}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--broadcast-mb", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--handoff-mb", type=int, default=64)
    parser.add_argument("--links", type=int, default=8, help="hand-offs in the chain (8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    args = parser.parse_args(argv)
    if args.quick:
        args.broadcast_mb, args.handoff_mb, args.repeat, args.workers = [16], 8, 1, [2]
    for n in args.workers:
        if n < 2:
            parser.error("--workers: at least 2 (the chain alternates between two)")
        run_cluster(n, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
