"""The pipeline example against Manager().dict() and against its ideal time.

Runs ``examples/pipeline.py``'s three stages over the same images three ways,
in one run:

* polystore: workers exchange arrays through ``shared_registry()``;
* ``Manager().dict()``: the same FileManager code over the spec's shared dict,
  where every array is pickled through the manager process;
* ideal: the stage functions' compute alone, measured in this process with
  storage that keeps references (no copy), plus one memcpy per hand-off,
  divided by the number of workers.

Targets: polystore >= 10x faster than the Manager dict, and within 1.5x of the
ideal. Run: ``python benchmarks/pipeline.py [--images N --side S]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import polystore
from polystore import FileManagerFactory

_spec = importlib.util.spec_from_file_location(
    "pipeline_example", Path(__file__).resolve().parent.parent / "examples" / "pipeline.py"
)
assert _spec is not None and _spec.loader is not None
pipeline = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_example"] = pipeline
_spec.loader.exec_module(pipeline)


class _References:
    """Stands in for a FileManager: keeps references, copies nothing."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def save(self, data: Any, path: str, backend: str) -> None:
        self.data[path] = data

    def load(self, path: str, backend: str) -> Any:
        return self.data[path]

    def delete(self, path: str, backend: str) -> None:
        del self.data[path]


def ideal_seconds(plan: Any, workers: int) -> tuple[float, float, float]:
    """(compute, memcpy, ideal) seconds for ``plan`` on ``workers`` workers."""
    refs: Any = _References()
    start = time.perf_counter()
    raw = [pipeline.generate(refs, i, plan.side) for i in range(plan.images)]
    smoothed = [pipeline.smooth(refs, p) for p in raw]
    groups = [smoothed[i : i + plan.group] for i in range(0, len(smoothed), plan.group)]
    for index, group in enumerate(groups):
        pipeline.project(refs, group, index)
    compute = time.perf_counter() - start
    src = np.ones((plan.side, plan.side), np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        np.copyto(dst, src)
    memcpy = (time.perf_counter() - start) / reps * plan.handoffs
    return compute, memcpy, (compute + memcpy) / workers


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
        factory = FileManagerFactory(registry)
        pipeline.run_pipeline(factory, pipeline.Plan(4, 64, 2), args.workers, context, False)
        ours, final = pipeline.run_pipeline(factory, plan, args.workers, context, False)
    manager, final_m = pipeline.run_with_manager(plan, args.workers, context)
    assert np.array_equal(final, final_m), "both pipelines must compute the same result"
    compute, memcpy, ideal = ideal_seconds(plan, args.workers)

    gib = plan.moved_bytes / 2**30
    print(
        f"{plan.images} images of {args.side}x{args.side} float32, {plan.handoffs} hand-offs, "
        f"{gib:.2f} GiB moved, {args.workers} workers ({args.start_method})"
    )
    print(f"{'method':34}{'seconds':>9}{'MB/s':>9}{'vs polystore':>14}")
    for label, seconds in [
        ("polystore shared_registry", ours),
        ("Manager().dict()", manager),
        ("ideal: (compute + memcpy) / workers", ideal),
    ]:
        rate = plan.moved_bytes / seconds / 1e6
        print(f"{label:34}{seconds:9.2f}{rate:9.0f}{seconds / ours:13.2f}x")
    print(f"  (compute alone {compute:.2f} s serial, memcpy of every hand-off {memcpy:.2f} s)")
    print(
        f"polystore is {manager / ours:.1f}x faster than Manager().dict() (target >= 10x) and "
        f"takes {ours / ideal:.2f}x the ideal time (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
