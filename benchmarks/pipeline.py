"""The pipeline example against Manager().dict() and against its ideal time.

Runs ``examples/pipeline.py``'s three stages over the same images three ways,
in one run:

* polystore: workers exchange arrays through ``shared_registry()``;
* ``Manager().dict()``: the same FileManager code over the spec's shared dict,
  where every array is pickled through the manager process;
* ideal: the same stage functions on a pool of the same size, each worker
  running whole groups of images so that nothing crosses a process boundary,
  with every hand-off replaced by one memcpy into warm, reused memory. This
  is "compute plus one memcpy per hand-off" under the same memory-bandwidth
  contention between workers as the real runs.

polystore runs as the example does: it reserves the pipeline's working set
of shared memory before the clock starts (``SharedArrayStore.reserve``); a
second polystore run without the reservation shows what that saves.

Targets: polystore >= 10x faster than the Manager dict, and within 1.5x of the
ideal. Each method makes two passes over the images on one pool: the first
meets cold memory (fresh shared-memory pages, workers that have mapped
nothing), the second is the steady state of a long-running pipeline; both
are reported.
Run: ``python benchmarks/pipeline.py [--images N --side S]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import polystore
from polystore import FileManagerFactory, MemoryBackend

_spec = importlib.util.spec_from_file_location(
    "pipeline_example", Path(__file__).resolve().parent.parent / "examples" / "pipeline.py"
)
assert _spec is not None and _spec.loader is not None
pipeline = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_example"] = pipeline
_spec.loader.exec_module(pipeline)


class _CopyIntoWarmMemory:
    """Stands in for a FileManager: one memcpy per save into reused, warm buffers."""

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}
        self.free: list[np.ndarray] = []

    def save(self, data: Any, path: str, backend: str) -> None:
        buf = self.free.pop() if self.free else np.empty_like(data)
        np.copyto(buf, data)
        self.data[path] = buf

    def load(self, path: str, backend: str) -> Any:
        return self.data[path]

    def delete(self, path: str, backend: str) -> None:
        self.free.append(self.data.pop(path))


_local_fm: Any = None


def _ideal_group(args: tuple[int, int, int]) -> int:
    """All three stages for one group of images, in this process: compute + memcpy only."""
    global _local_fm
    first, count, side = args
    if _local_fm is None:
        _local_fm = _CopyIntoWarmMemory()
    fm = _local_fm
    smoothed = [
        pipeline.smooth(fm, pipeline.generate(fm, i, side)) for i in range(first, first + count)
    ]
    fm.delete(pipeline.project(fm, smoothed, first), "memory")
    return count


def ideal_seconds(plan: Any, workers: int, context: Any) -> float:
    """The pipeline's compute plus one memcpy per hand-off, on the same kind of pool.

    Each worker runs whole groups, so nothing crosses a process boundary; every
    hand-off is one copy into warm memory. Run twice, the second run is timed.
    """
    groups = [
        (i, min(plan.group, plan.images - i), plan.side) for i in range(0, plan.images, plan.group)
    ]
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_ideal_group, groups))
        start = time.perf_counter()
        list(pool.map(_ideal_group, groups))
        return time.perf_counter() - start


def two_passes(
    factory: FileManagerFactory, plan: Any, workers: int, context: Any
) -> tuple[float, float, np.ndarray]:
    """Run the pipeline twice on one pool: (first pass s, second pass s, result).

    The first pass finds cold memory: fresh shared-memory pages, workers that
    have mapped nothing yet. The second pass is the steady state of a
    long-running pipeline: the same workers, memory recycled.
    """
    times = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=factory.initializer) as pool:
        list(pool.map(abs, range(workers)))  # start the workers before the clock
        fm = factory()
        for _ in range(2):
            start = time.perf_counter()
            projections = pipeline.stream(pool, plan, window=4 * workers, progress=False)
            final = np.max([fm.load(p, backend="memory") for p in projections], axis=0)
            times.append(time.perf_counter() - start)
            for path in projections:
                fm.delete(path, backend="memory")
    return times[0], times[1], final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", default="forkserver")
    args = parser.parse_args()
    plan = pipeline.Plan(args.images, args.side, args.group)
    context = multiprocessing.get_context(args.start_method)

    with polystore.shared_registry() as registry:
        pipeline.reserve(registry, plan, args.workers)  # as the example does
        cold, ours, final = two_passes(FileManagerFactory(registry), plan, args.workers, context)
    with polystore.shared_registry() as registry:
        bare_cold, bare, _ = two_passes(FileManagerFactory(registry), plan, args.workers, context)
    with context.Manager() as manager_process:
        backend = MemoryBackend(shared_dict=manager_process.dict(), store=None)
        manager_cold, manager, final_m = two_passes(
            FileManagerFactory({"memory": backend}), plan, args.workers, context
        )
    assert np.array_equal(final, final_m), "both pipelines must compute the same result"
    ideal = ideal_seconds(plan, args.workers, context)

    gib = plan.moved_bytes / 2**30
    print(
        f"{plan.images} images of {args.side}x{args.side} float32, {plan.handoffs} hand-offs, "
        f"{gib:.2f} GiB moved, {args.workers} workers ({args.start_method})"
    )
    print(f"{'method':34}{'seconds':>9}{'MB/s':>9}{'vs polystore':>14}")
    for label, seconds in [
        ("polystore, second pass (steady)", ours),
        ("polystore, first pass (cold)", cold),
        ("  same, without reserve(): 1st pass", bare_cold),
        ("  same, without reserve(): 2nd pass", bare),
        ("Manager().dict(), second pass", manager),
        ("Manager().dict(), first pass", manager_cold),
        ("ideal: compute + 1 memcpy/hand-off", ideal),
    ]:
        rate = plan.moved_bytes / seconds / 1e6
        print(f"{label:34}{seconds:9.2f}{rate:9.0f}{seconds / ours:13.2f}x")
    print(
        f"steady: polystore is {manager / ours:.1f}x faster than Manager().dict() "
        f"(target >= 10x) and takes {ours / ideal:.2f}x the ideal time (target <= 1.5x); "
        f"first pass: {manager_cold / cold:.1f}x and {cold / ideal:.2f}x"
    )


if __name__ == "__main__":
    main()
