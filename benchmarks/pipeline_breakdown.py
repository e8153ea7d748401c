"""Where the pipeline's time goes: its stages and its FileManager calls, timed inside the workers.

Runs the steady pass of ``examples/pipeline.py`` three ways on pools of the
same kind: with polystore (as ``benchmarks/pipeline.py`` runs it, working set
reserved and workers premapped); as that benchmark's "same tasks, no
hand-off" variant, where every output goes into warm private buffers; and as
its floor, the same in shared memory. Each worker adds up the time of every
stage call (generate, smooth, project) and, inside them, of every
``create_array`` (entering and leaving the block), ``load`` and ``delete``.
The differences split the hand-offs' cost: the store's own code (the
FileManager calls), the stages' compute on shared memory pages (the floor's
extra compute) and the rest of their compute (data written by other
processes, other blocks).

Medians over ``--repeat`` rounds (fresh pools each) of worker time summed over
the workers, in ms per pass. ``--first`` times each pool's first pass instead
(polystore's working set reserved and premapped as the example does; the
other two meet fresh private buffers, so compare polystore's rows with its
own steady pass there). Run: ``python benchmarks/pipeline_breakdown.py``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polystore
from polystore import FileManager

_spec = importlib.util.spec_from_file_location(
    "pipeline_benchmark", Path(__file__).resolve().parent / "pipeline.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_benchmark"] = bench
_spec.loader.exec_module(bench)
pipeline = bench.pipeline

STAGES = ("generate", "smooth", "project")
CALLS = ("create_array (enter)", "create_array (exit)", "load", "delete")

#: this worker's totals, in seconds, since the last report
_spent: collections.defaultdict[str, float] = collections.defaultdict(float)


def _timed(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            _spent[name] += time.perf_counter() - start

    return run


def _timed_create(func: Callable[..., Any]) -> Callable[..., Any]:
    @contextlib.contextmanager
    def create_array(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = time.perf_counter()
        block = func(*args, **kwargs)
        array = block.__enter__()
        _spent["create_array (enter)"] += time.perf_counter() - start
        try:
            yield array
        except BaseException:
            if not block.__exit__(*sys.exc_info()):
                raise
            return
        start = time.perf_counter()
        block.__exit__(None, None, None)
        _spent["create_array (exit)"] += time.perf_counter() - start

    return create_array


def _instrument(manager_type: type) -> None:
    """In this worker: time the example's stages and ``manager_type``'s calls."""
    for stage in STAGES:
        setattr(pipeline, stage, _timed(stage, getattr(pipeline, stage)))
    for call in ("load", "delete"):
        setattr(manager_type, call, _timed(call, getattr(manager_type, call)))
    manager_type.create_array = _timed_create(manager_type.create_array)  # type: ignore[attr-defined]


def _polystore_worker(factory: polystore.FileManagerFactory) -> None:
    factory.initializer()
    _instrument(FileManager)


def _no_handoff_worker(side: int, shared: bool) -> None:
    bench._no_handoff_worker(side, shared)
    _instrument(bench._NoHandOff)


def _report(pause: float) -> tuple[int, dict[str, float]]:
    import os

    time.sleep(pause)  # so that every worker of the pool gets one of these
    spent = dict(_spent)
    _spent.clear()
    return os.getpid(), spent


def _collect(pool: Any, workers: int) -> dict[str, float]:
    """The workers' totals since their last report, summed."""
    seen: dict[int, dict[str, float]] = {}
    for _ in range(50):
        for _ in range(2 * workers):
            pool.submit(_report, 0.02)
        for _ in range(2 * workers):
            pid, spent = pool.next_result()[1]
            if pid not in seen or spent:
                seen[pid] = spent
        if len(seen) >= workers:
            break
    total: collections.defaultdict[str, float] = collections.defaultdict(float)
    for spent in seen.values():
        for name, seconds in spent.items():
            total[name] += seconds
    return dict(total)


def _timed_pass(
    pool: Any, fm: Any, plan: Any, workers: int, first: bool
) -> tuple[float, dict[str, float]]:
    """(wall seconds, worker totals) of the pool's first pass, or of the one after it."""
    if not first:
        pipeline.stream(pool, fm, plan, window=4 * workers, progress=False)
    _collect(pool, workers)
    start = time.perf_counter()
    pipeline.stream(pool, fm, plan, window=4 * workers, progress=False)
    wall = time.perf_counter() - start
    return wall, _collect(pool, workers)


def main() -> None:
    args, plan, context, repeat = bench.parse_run(__doc__.splitlines()[0], first=True)
    runs: dict[str, list[dict[str, float]]] = {"polystore": [], "no hand-off": [], "floor": []}
    for _ in range(repeat):
        with polystore.shared_registry() as registry:
            pipeline.reserve(registry, plan, args.workers)
            factory = polystore.FileManagerFactory(registry, premap=True)
            worker = functools.partial(_polystore_worker, factory)
            with pipeline.StagePool(args.workers, context, worker) as pool:
                wall, spent = _timed_pass(pool, factory(), plan, args.workers, args.first)
        runs["polystore"].append({"wall": wall, **spent})
        for run, shared in (("no hand-off", False), ("floor", True)):
            worker = functools.partial(_no_handoff_worker, plan.side, shared)
            with pipeline.StagePool(args.workers, context, worker) as pool:
                parent = bench._NoHandOff(plan.side, shared)
                wall, spent = _timed_pass(pool, parent, plan, args.workers, args.first)
            runs[run].append({"wall": wall, **spent})

    def med(run: str, name: str) -> float:
        return 1e3 * statistics.median(r.get(name, 0.0) for r in runs[run])

    print(
        f"{plan.images} images of {args.side}x{args.side} float32, {args.workers} workers "
        f"({args.start_method}), {'first' if args.first else 'steady'} pass; ms, medians of "
        f"{repeat} rounds"
    )
    print(f"{'':28}{'polystore':>12}{'no hand-off':>13}{'difference':>12}{'floor':>9}")
    rows = [("wall time of the pass", "wall"), *[(s, s) for s in STAGES]]
    rows += [(f"  {c}", c) for c in CALLS]
    for label, name in rows:
        ours, theirs = med("polystore", name), med("no hand-off", name)
        floor = med("floor", name)
        print(f"{label:28}{ours:12.1f}{theirs:13.1f}{ours - theirs:12.1f}{floor:9.1f}")
    stages = {run: sum(med(run, s) for s in STAGES) for run in runs}
    calls = {run: sum(med(run, c) for c in CALLS) for run in runs}
    extra_calls = calls["polystore"] - calls["no hand-off"]
    extra_compute = stages["polystore"] - stages["no hand-off"] - extra_calls
    pages = stages["floor"] - calls["floor"] - (stages["no hand-off"] - calls["no hand-off"])
    print(
        f"worker time in the stages: {stages['polystore']:.0f} ms against "
        f"{stages['no hand-off']:.0f} ms; of the {stages['polystore'] - stages['no hand-off']:.0f} "
        f"ms more, FileManager calls {extra_calls:.0f} ms, the stages' compute "
        f"{extra_compute:.0f} ms, of which the floor (shared memory pages, no store) "
        f"took {pages:.0f} ms"
    )


if __name__ == "__main__":
    main()
