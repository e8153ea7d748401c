"""Disk backend against raw numpy and filelock, side by side in one run.

Run: ``python benchmarks/disk.py`` (``--help`` for sizes and repetitions).

Prints one table. Each polystore case is timed interleaved with its peer, in
the same directory, and the medians are compared:

* 64 MB ``.npy`` save and load through ``DiskBackend`` and ``FileManager``
  against ``np.save``/``np.load`` on a path. Saves are measured twice: over an
  existing file (the old file's pages are freed during the call in both
  cases) and into a new path each time.
* the cost the atomic write adds to an 8 KB save: temporary file, commit lock
  and rename, against ``np.save`` over the same file.
* ``atomic_update_json`` throughput, one process and four processes
  contending for one counter, against the same read-modify-write loop under
  ``filelock.FileLock`` (default 50 ms polling, and 1 ms polling).

Nothing here is asserted; the targets are printed beside the ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from polystore.disk import DiskBackend
from polystore.locks import atomic_update_json, directory_lock, file_lock, write_atomic

Row = tuple[str, float, str, float, str, str]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per case, running the cases round-robin to share the noise.

    A case that returns a float reports its own time (to leave set-up out).
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            samples[name].append(result if isinstance(result, float) else elapsed)
    return {name: statistics.median(times) for name, times in samples.items()}


def file_manager(root: str) -> Any:
    try:
        from polystore import FileManager
    except ImportError:
        return None
    return FileManager({"disk": DiskBackend(root)})


# -- 64 MB arrays -----------------------------------------------------------------------


def bench_large(work: str, size_mb: int, reps: int) -> list[Row]:
    data = np.random.default_rng(0).random(size_mb * 2**20 // 8)
    raw_path = os.path.join(work, "raw.npy")
    backend = DiskBackend(work)
    fm = file_manager(work)
    for name in ("raw.npy", "disk.npy", "fm.npy"):
        np.save(os.path.join(work, name), data)

    save_cases: dict[str, Callable[[], object]] = {
        "raw": lambda: np.save(raw_path, data),
        "disk": lambda: backend.save(data, "disk.npy"),
    }
    load_cases: dict[str, Callable[[], object]] = {
        "raw": lambda: np.load(raw_path),
        "disk": lambda: backend.load("disk.npy"),
    }
    if fm is not None:
        save_cases["fm"] = lambda: fm.save(data, "fm.npy", backend="disk")
        load_cases["fm"] = lambda: fm.load("fm.npy", backend="disk")
    overwrite = interleaved(save_cases, reps)
    load = interleaved(load_cases, reps)
    fresh = interleaved(fresh_cases(work, data, backend, fm), reps)

    mb = f"{size_mb} MB .npy"
    rows = []
    for who, label in (("disk", "DiskBackend"), ("fm", "FileManager")):
        if who not in overwrite:
            continue
        rows += [
            (
                f"{mb} save over a file, {label}",
                overwrite[who] * 1e3,
                "np.save",
                overwrite["raw"] * 1e3,
                "ms",
                "<= 1.10",
            ),
            (
                f"{mb} save to a new path, {label}",
                fresh[who] * 1e3,
                "np.save",
                fresh["raw"] * 1e3,
                "ms",
                "<= 1.10",
            ),
            (f"{mb} load, {label}", load[who] * 1e3, "np.load", load["raw"] * 1e3, "ms", "<= 1.05"),
        ]
    return rows


def fresh_cases(
    work: str, data: np.ndarray, backend: DiskBackend, fm: Any
) -> dict[str, Callable[[], object]]:
    """Saves into a path that does not exist yet; removing the last one is not timed."""
    savers: dict[str, Callable[[str], object]] = {
        "raw": lambda name: np.save(os.path.join(work, name), data),
        "disk": lambda name: backend.save(data, name),
    }
    if fm is not None:
        savers["fm"] = lambda name: fm.save(data, name, backend="disk")

    def case(key: str) -> Callable[[], float]:
        name = f"fresh-{key}.npy"

        def run() -> float:
            if os.path.exists(os.path.join(work, name)):
                os.unlink(os.path.join(work, name))
            return timed(lambda: savers[key](name))

        return run

    return {key: case(key) for key in savers}


# -- 8 KB overhead -------------------------------------------------------------------------


def bench_small(work: str, reps: int) -> list[Row]:
    data = np.random.default_rng(0).random(1024)  # 8 KB
    backend = DiskBackend(work)
    raw_path = os.path.join(work, "small-raw.npy")
    batch = 20

    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batch):
                fn()

        return run

    times = interleaved(
        {
            "raw": loop(lambda: np.save(raw_path, data)),
            "disk": loop(lambda: backend.save(data, "small.npy")),
            "meta": loop(lambda: backend.save(data, "small-meta.npy", metadata={"k": 1})),
        },
        reps * 4,
    )
    raw, disk, meta = (times[k] / batch * 1e6 for k in ("raw", "disk", "meta"))
    return [
        ("8 KB save, DiskBackend", disk, "np.save", raw, "us", "overhead <= 300 us"),
        ("8 KB save + metadata, DiskBackend", meta, "np.save", raw, "us", "overhead"),
        *bench_locks(work, reps),
    ]


def bench_locks(work: str, reps: int) -> list[Row]:
    """Uncontended lock round trips: the commit lock every save takes, and file_lock."""
    from filelock import FileLock

    target = os.path.join(work, "locked.json")
    peer = FileLock(target + ".lock")
    batch = 100

    def loop(enter: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batch):
                with enter():
                    pass

        return run

    times = interleaved(
        {
            "commit": loop(lambda: directory_lock(work, 60.0)),
            "file_lock": loop(lambda: file_lock(target)),
            "filelock": loop(lambda: peer.acquire()),
        },
        reps * 2,
    )
    commit, ours, theirs = (times[k] / batch * 1e6 for k in ("commit", "file_lock", "filelock"))
    return [
        (
            "commit lock (in every save), uncontended",
            commit,
            "filelock.FileLock",
            theirs,
            "us",
            "report",
        ),
        ("file_lock, uncontended", ours, "filelock.FileLock", theirs, "us", "report"),
    ]


# -- atomic_update_json under contention ---------------------------------------------------


def _increment(n: int) -> int:
    return n + 1


def _polystore_loop(path: str, n: int, poll: float) -> None:
    for _ in range(n):
        atomic_update_json(path, _increment, default=0)


def _filelock_loop(path: str, n: int, poll: float) -> None:
    from filelock import FileLock

    lock = FileLock(path + ".lock")
    for _ in range(n):
        with lock.acquire(poll_interval=poll):
            try:
                with open(path, "rb") as f:
                    value = json.load(f)
            except FileNotFoundError:
                value = 0
            write_atomic(path, json.dumps(value + 1).encode())


def _worker(
    loop: Callable[[str, int, float], None], path: str, n: int, poll: float, go: Any, out: Any
) -> None:
    go.wait()
    start = time.monotonic()
    loop(path, n, poll)
    out.put((start, time.monotonic()))


def updates_per_second(
    loop: Callable[[str, int, float], None], work: str, procs: int, n: int, poll: float = 0.05
) -> float:
    ctx = multiprocessing.get_context("spawn")
    path = os.path.join(work, f"counter-{loop.__name__}-{procs}-{poll}.json")
    if os.path.exists(path):
        os.unlink(path)
    go, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(loop, path, n, poll, go, out)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let every child finish importing before the start signal
    go.set()
    spans = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    with open(path) as f:
        assert json.load(f) == procs * n, "lost an update"
    return procs * n / (max(end for _, end in spans) - min(start for start, _ in spans))


def bench_contention(work: str, n: int, rounds: int = 3) -> list[Row]:
    """Medians over ``rounds``, the three loops alternating, to share the machine's noise."""
    rows: list[Row] = []
    for procs in (1, 4):
        runs: dict[str, list[float]] = {"ours": [], "0.05": [], "0.001": []}
        for _ in range(rounds):
            runs["ours"].append(updates_per_second(_polystore_loop, work, procs, n))
            for poll in (0.05, 0.001):
                runs[str(poll)].append(updates_per_second(_filelock_loop, work, procs, n, poll))
        ours = statistics.median(runs["ours"])
        for poll in (0.05, 0.001):
            rows.append(
                (
                    f"atomic_update_json, {procs} proc(s)",
                    ours,
                    f"filelock poll {poll * 1e3:g} ms",
                    statistics.median(runs[str(poll)]),
                    "updates/s",
                    "report",
                )
            )
    return rows


# -- report ---------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    header = ("case", "polystore", "peer", "peer value", "ratio", "target")
    lines = [header]
    for case, ours, peer, theirs, unit, target in rows:
        ratio = ours / theirs
        if unit == "updates/s":
            ratio_text = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        else:
            ratio_text = f"{ratio:.3f}"
            if target.startswith("overhead"):
                ratio_text += f" (+{ours - theirs:.0f} us)"
        lines.append(
            (case, f"{ours:,.1f} {unit}", peer, f"{theirs:,.1f} {unit}", ratio_text, target)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for k, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--updates", type=int, default=100, help="per process and run")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-disk-", dir=args.dir)
    try:
        rows = bench_large(work, args.size_mb, args.reps)
        rows += bench_small(work, args.reps)
        rows += bench_contention(work, args.updates)
    finally:
        shutil.rmtree(work)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average during the run (1/5/15 min, at the end): {load}; {os.cpu_count()} CPUs")
    print_table(rows)


if __name__ == "__main__":
    main()
