"""What the FileManager layer costs: dispatch overhead and a 64 MB .npy on disk.

Side by side, in one run:

* memory: ``dict[key] = value`` / ``dict[key]`` against ``MemoryBackend.save``/``load``
  called directly and through ``FileManager`` (the difference between the last two
  is the dispatch overhead; target <= 5 us per call);
* disk: ``np.save``/``np.load`` of a 64 MB float32 array against
  ``FileManager.save``/``load`` on the disk backend (target ratio <= 1.05).

Run: ``python benchmarks/foundation.py [--quick]``. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from polystore import BackendRegistry, DiskBackend, FileManager, MemoryBackend


def per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median seconds per call over ``repeats`` batches of ``calls`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def memory_rows(calls: int, repeats: int) -> list[tuple[str, float, float]]:
    small = np.arange(16, dtype=np.float32)
    plain: dict[str, np.ndarray] = {}
    backend = MemoryBackend()
    fm = FileManager({"memory": backend})
    rows = []
    for label, save, load in [
        (
            "plain dict",
            lambda: plain.__setitem__("/a/b.npy", small.copy()),
            lambda: plain["/a/b.npy"],
        ),
        (
            "MemoryBackend direct",
            lambda: backend.save(small, "a/b.npy"),
            lambda: backend.load("a/b.npy"),
        ),
        (
            "FileManager",
            lambda: fm.save(small, "a/b.npy", backend="memory"),
            lambda: fm.load("a/b.npy", backend="memory"),
        ),
    ]:
        save()
        rows.append((label, per_call(save, calls, repeats), per_call(load, calls, repeats)))
    return rows


def disk_rows(repeats: int, size: int) -> list[tuple[str, float, float]]:
    array = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="polystore-bench-") as tmp:
        fm = FileManager(BackendRegistry({"disk": DiskBackend(root=tmp)}))
        raw_path = os.path.join(tmp, "raw.npy")
        cases = [
            ("np.save / np.load", lambda: np.save(raw_path, array), lambda: np.load(raw_path)),
            (
                "FileManager disk",
                lambda: fm.save(array, "fm.npy", backend="disk"),
                lambda: fm.load("fm.npy", backend="disk"),
            ),
        ]
        rows = []
        times: dict[str, tuple[list[float], list[float]]] = {c[0]: ([], []) for c in cases}
        for _ in range(repeats):
            # Interleave the two so that page-cache and noise drift hit both alike.
            for label, save, load in cases:
                start = time.perf_counter()
                save()
                mid = time.perf_counter()
                load()
                times[label][0].append(mid - start)
                times[label][1].append(time.perf_counter() - mid)
        for label, _, _ in cases:
            saves, loads = times[label]
            rows.append((label, statistics.median(saves), statistics.median(loads)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    calls, repeats, disk_repeats = (2000, 5, 3) if args.quick else (20000, 9, 9)

    print("memory backend, 64-byte array, per call (median)")
    print(f"{'':24}{'save us':>10}{'load us':>10}")
    rows = memory_rows(calls, repeats)
    for label, save, load in rows:
        print(f"{label:24}{save * 1e6:10.2f}{load * 1e6:10.2f}")
    direct, via_fm = rows[1], rows[2]
    print(
        f"FileManager dispatch overhead: save {(via_fm[1] - direct[1]) * 1e6:+.2f} us, "
        f"load {(via_fm[2] - direct[2]) * 1e6:+.2f} us per call (target <= 5 us)"
    )
    print()
    size = 64 * 2**20
    print(f"disk, {size // 2**20} MB float32 .npy (median of {disk_repeats})")
    print(f"{'':24}{'save ms':>10}{'load ms':>10}{'save x':>9}{'load x':>9}")
    drows = disk_rows(disk_repeats, size)
    base = drows[0]
    for label, save, load in drows:
        print(
            f"{label:24}{save * 1e3:10.1f}{load * 1e3:10.1f}"
            f"{save / base[1]:9.2f}{load / base[2]:9.2f}"
        )
    total = (drows[1][1] + drows[1][2]) / (base[1] + base[2])
    print(f"FileManager disk save+load vs raw: {total:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
