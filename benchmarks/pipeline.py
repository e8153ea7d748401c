"""The pipeline example against Manager().dict() and against its ideal time.

Runs ``examples/pipeline.py``'s three stages over the same images three ways,
in one run:

* polystore: workers exchange arrays through ``shared_registry()``;
* ``Manager().dict()``: the same FileManager code over the spec's shared dict,
  where every array is pickled through the manager process;
* ideal: the same stage functions on a pool of the same size, each worker
  running whole groups of images so that nothing crosses a process boundary,
  computing into warm, reused buffers with no hand-off at all. This is the
  compute alone, under the same memory-bandwidth contention between workers
  as the real runs.

polystore runs as the example does: it reserves the pipeline's working set
of shared memory before the clock starts (``SharedArrayStore.reserve``) and
its workers map that memory as they start (``FileManagerFactory(...,
premap=True)``); a second polystore run without either shows what they save,
and a third runs on a ``ProcessPoolExecutor`` instead of the example's
``StagePool``, to show what the standard pool's cost per task adds.

Targets (the stages compute straight into shared memory with
``create_array``, so a hand-off copies nothing): polystore >= 20x faster than
the Manager dict, its steady pass within 1.05x of the ideal and its first pass
within 1.25x. Last, one 512 MB result is handed off (published by one process,
viewed by another) against a target of 50 us.

Each method makes two passes over the images on one pool: the first meets
cold memory (shared memory the workers meet for the first time, fresh
work buffers), the second is the steady state of a long-running pipeline;
both are reported. The machine is noisy, so every variant but the Manager
dict runs ``--repeat`` times, round after round (polystore's on fresh pools,
the ideal's and the others' on pools that stay up, the ideal's pass right
after polystore's) so that a change in load weighs on all alike, and
medians are reported; the Manager dict, at ten seconds a pass, runs on one
pool.

One more variant separates the hand-offs' cost from the schedule's: the
pipeline's own tasks, in the same order on the same kind of pool, with every
hand-off left out (each worker computes into warm private buffers and reads
warm private buffers in place of another process's output). Its twin in
shared memory is the floor of any hand-off through shared memory on this
schedule: the same tasks computing in a store's kind of pages (files in
``/dev/shm`` or ``POLYSTORE_SHM_DIR``), with no store code at all.

Last, the steady passes of polystore, the floor and the ideal are taken in
turns on pools that stay up (``--cycles`` of each): the ratios within a
cycle, a second or so apart, are the steadiest measure this machine gives
of what polystore adds to the floor and the floor to the ideal. A second
polystore registry and pool, made after the first, runs in the same turns:
the ratio of the two (A/A) shows what the placement of memory alone does.
Run: ``python benchmarks/pipeline.py [--images N --side S]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib.util
import mmap
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import polystore
from polystore import FileManagerFactory, MemoryBackend
from polystore._shm.layout import default_dir

_spec = importlib.util.spec_from_file_location(
    "pipeline_example", Path(__file__).resolve().parent.parent / "examples" / "pipeline.py"
)
assert _spec is not None and _spec.loader is not None
pipeline = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_example"] = pipeline
_spec.loader.exec_module(pipeline)


class _ComputeOnly:
    """Stands in for a FileManager: outputs are warm, reused buffers; nothing is handed off."""

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}
        self.free: list[np.ndarray] = []

    @contextlib.contextmanager
    def create_array(
        self, path: str, shape: Any, dtype: Any, backend: str, **kwargs: Any
    ) -> Iterator[Any]:
        buf = self.free.pop() if self.free else np.empty(shape, dtype)
        yield buf
        self.data[path] = buf

    def load(self, path: str, backend: str) -> Any:
        return self.data[path]

    def delete(self, path: str, backend: str) -> None:
        self.free.append(self.data.pop(path))


class _NoHandOff(_ComputeOnly):
    """Stands in for a FileManager in the pipeline's own schedule, with no hand-off.

    Outputs go into a ring of warm private buffers; an input made in another
    process is one of another ring of warm buffers of the same shape. The
    stage tasks, their number and order, the pool and the parent's loop are
    those of the real run: only the data stays put.
    """

    def __init__(self, side: int, shared: bool = False) -> None:
        super().__init__()
        # Written, not just allocated: an untouched array reads the kernel's
        # one zero page, always in cache, which no real input is.
        if shared:
            self.made, self.foreign = _shared_pages(8, side), _shared_pages(8, side)
        else:
            self.made = [np.ones((side, side), np.float32) for _ in range(8)]
            self.foreign = [np.ones((side, side), np.float32) for _ in range(8)]
        self.turn = 0

    @contextlib.contextmanager
    def create_array(
        self, path: str, shape: Any, dtype: Any, backend: str, **kwargs: Any
    ) -> Iterator[Any]:
        self.turn += 1
        buf = self.made[self.turn % len(self.made)]
        yield buf
        self.data[path] = buf

    def load(self, path: str, backend: str) -> Any:
        found = self.data.get(path)
        if found is None:
            self.turn += 1
            found = self.foreign[self.turn % len(self.foreign)]
        return found

    def delete(self, path: str, backend: str) -> None:
        self.data.pop(path, None)


def _shared_pages(count: int, side: int) -> list[np.ndarray]:
    """``count`` zeroed images in shared memory of the kind a store gets, in its directory.

    A file in the store's directory (``/dev/shm`` unless ``POLYSTORE_SHM_DIR``
    says otherwise), mapped shared and unlinked at once: the same pages, of
    the same size, as a store's blocks, with no store code around them.
    """
    nbytes = count * side * side * 4
    with tempfile.TemporaryFile(dir=default_dir()) as file:
        file.truncate(nbytes)
        memory = mmap.mmap(file.fileno(), nbytes)
    images = np.frombuffer(memory, np.float32).reshape(count, side, side)
    images[:] = 0
    return list(images)


def _no_handoff_worker(side: int, shared: bool = False) -> None:
    """Pool initializer: the example's stage tasks in this worker get a :class:`_NoHandOff`.

    ``shared``: its buffers are shared memory (:func:`_shared_pages`), not private.
    """
    stand_in = _NoHandOff(side, shared)
    polystore.current_filemanager = lambda: stand_in  # type: ignore[assignment,return-value]


def _standing(stack: contextlib.ExitStack, plan: Any, workers: int, context: Any) -> dict[str, Any]:
    """Passes of the ideal, the no-hand-off tasks and the floor, on pools that stay up.

    Returns a function per variant that runs one pass; each has run one
    already, untimed. ``"no_handoff"``: the pipeline's own schedule
    (``stream``) with every hand-off left out, the gap to the ideal being the
    schedule's (fine-grained tasks, the parent's loop and fold on the same
    cores) and to polystore the hand-offs'. ``"floor"``: the same in shared
    memory instead of private memory, the floor of any hand-off through
    shared memory on this schedule: its pages, with no store code at all.
    The pools close with ``stack``.
    """
    ideal = stack.enter_context(pipeline.StagePool(workers, context))
    runs: dict[str, Any] = {"ideal": functools.partial(_ideal_pass, ideal, plan)}
    for name, shared in (("no_handoff", False), ("floor", True)):
        worker = functools.partial(_no_handoff_worker, plan.side, shared)
        pool = stack.enter_context(pipeline.StagePool(workers, context, worker))
        parent = _NoHandOff(plan.side, shared)  # it folds the projections: from shared memory too
        runs[name] = functools.partial(pipeline.stream, pool, parent, plan, 4 * workers, False)
    for run in runs.values():
        run()
    return runs


def _seconds(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


_local_fm: Any = None


def _ideal_group(args: tuple[int, int, int]) -> int:
    """All three stages for one group of images, in this process: the compute alone."""
    global _local_fm
    first, count, side = args
    if _local_fm is None:
        _local_fm = _ComputeOnly()
    fm = _local_fm
    smoothed = [
        pipeline.smooth(fm, pipeline.generate(fm, i, side)) for i in range(first, first + count)
    ]
    projection = pipeline.project(fm, smoothed, first)
    _fold(fm.load(projection, "memory"))  # as the pipeline's parent folds each one
    fm.delete(projection, "memory")
    return count


_folded: np.ndarray | None = None


def _fold(projection: np.ndarray) -> None:
    """The parent's reduction of a projection into the overall maximum (``stream``)."""
    global _folded
    if _folded is None:
        _folded = np.array(projection)
    else:
        np.maximum(_folded, projection, out=_folded)


def _ideal_pass(pool: Any, plan: Any) -> None:
    """One pass of the ideal on ``pool``: each task runs a whole group."""
    groups = [
        (i, min(plan.group, plan.images - i), plan.side) for i in range(0, plan.images, plan.group)
    ]
    for group in groups:
        pool.submit(_ideal_group, group)
    for _ in groups:
        pool.next_result()


def interleaved(
    plan: Any, workers: int, context: Any, cycles: int, standing: dict[str, Any]
) -> dict[str, list[float]]:
    """Steady passes of polystore, the floor and the ideal, taken in turns: seconds of each.

    polystore gets a pool of its own that stays up, as the floor and the
    ideal have (``standing``); each cycle runs one pass of each, back to
    back, after a polystore pass untimed. The machine's speed drifts within
    seconds; a pass and the passes beside it in its cycle meet nearly the
    same machine, so the ratios within a cycle are the steadiest measure
    of what polystore adds to the floor, and the floor to the ideal.
    ``"polystore B"`` is the same on a second registry and pool, made after
    the first: the two differ only in where their memory lies.
    """
    passes: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        # A second registry of the same code, made after the first: the
        # ratio of the two (A/A) is what the placement of their memory
        # alone does, the noise floor of the other ratios.
        for name in ("polystore", "polystore B"):
            registry = stack.enter_context(polystore.shared_registry())
            pipeline.reserve(registry, plan, workers)
            factory = FileManagerFactory(registry, premap=True)
            pool = stack.enter_context(pipeline.StagePool(workers, context, factory.initializer))
            passes[name] = functools.partial(
                pipeline.stream, pool, factory(), plan, 4 * workers, False
            )
            passes[name]()
        passes["floor"], passes["ideal"] = standing["floor"], standing["ideal"]
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(cycles):
            for name, run in passes.items():
                times[name].append(_seconds(run))
    return times


class _OnExecutor:
    """A ``ProcessPoolExecutor`` behind the two calls of the example's ``StagePool``.

    For the row that runs the example's pipeline on the standard pool, to
    show what its cost per task adds.
    """

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool = pool
        self.done: queue.SimpleQueue[tuple[int, Future[Any]]] = queue.SimpleQueue()
        self.count = 0

    def submit(self, function: Any, args: Any) -> int:
        self.count += 1
        token = self.count
        self.pool.submit(function, args).add_done_callback(lambda f: self.done.put((token, f)))
        return token

    def next_result(self) -> tuple[int, Any]:
        token, future = self.done.get()
        return token, future.result()


def _pid_after_nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@contextlib.contextmanager
def _pool(factory: FileManagerFactory, workers: int, context: Any, executor: bool) -> Iterator[Any]:
    """The example's ``StagePool``, or (``executor``) a ``ProcessPoolExecutor`` in its shape.

    Either has run ``factory.initializer`` in every worker when it is handed out.
    """
    if not executor:
        with pipeline.StagePool(workers, context, factory.initializer) as stages:
            yield stages
        return
    with ProcessPoolExecutor(workers, mp_context=context, initializer=factory.initializer) as pool:
        seen: set[int] = set()
        while len(seen) < workers:  # a process that is still starting holds back a pass
            seen.update(pool.map(_pid_after_nap, [0.02] * (2 * workers)))
        yield _OnExecutor(pool)


def two_passes(
    factory: FileManagerFactory,
    plan: Any,
    workers: int,
    context: Any,
    setup: list[float],
    executor: bool = False,
) -> tuple[float, float, np.ndarray]:
    """Run the pipeline twice on one pool: (first pass s, second pass s, result).

    The first pass finds cold memory: fresh shared-memory pages, workers that
    have mapped nothing yet. The second pass is the steady state of a
    long-running pipeline: the same workers, memory recycled. The time the
    pool takes to start (with the workers' premap, if any) goes to ``setup``.
    ``executor``: on a ``ProcessPoolExecutor`` instead of the example's pool.
    """
    times = []
    started = time.perf_counter()
    with _pool(factory, workers, context, executor) as pool:
        setup.append(time.perf_counter() - started)
        fm = factory()
        for _ in range(2):
            start = time.perf_counter()
            final = pipeline.stream(pool, fm, plan, window=4 * workers, progress=False)
            times.append(time.perf_counter() - start)
    return times[0], times[1], final


def polystore_runs(
    plan: Any, workers: int, context: Any, repeat: int, prepared: bool, executor: bool = False
) -> tuple[float, float, float, np.ndarray]:
    """Median first pass, second pass and set-up over ``repeat`` fresh registries and pools.

    ``prepared``: as the example runs, with ``reserve()`` and ``premap=True``.
    Set-up: the reservation plus the start of the pool, before the clock.
    ``executor``: on a ``ProcessPoolExecutor``.
    """
    firsts, seconds, setups = [], [], []
    for _ in range(repeat):
        with polystore.shared_registry() as registry:
            started = time.perf_counter()
            if prepared:
                pipeline.reserve(registry, plan, workers)
            setup = [time.perf_counter() - started]
            factory = FileManagerFactory(registry, premap=prepared)
            first, second, final = two_passes(factory, plan, workers, context, setup, executor)
        firsts.append(first)
        seconds.append(second)
        setups.append(sum(setup))
    med = statistics.median
    return med(firsts), med(seconds), med(setups), final


def parse_run(
    description: str, cycles: bool = False, first: bool = False
) -> tuple[argparse.Namespace, Any, Any, int]:
    """The command line of a pipeline benchmark: (arguments, plan, start context, repeat).

    ``cycles``: also take ``--cycles`` (:func:`interleaved`); ``first``: also
    take ``--first`` (time the first pass instead of the steady one).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", default="forkserver")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of fresh pools")
    if cycles:
        parser.add_argument(
            "--cycles", type=int, default=15, help="steady passes of each, taken in turns"
        )
    if first:
        parser.add_argument(
            "--first", action="store_true", help="time the first pass, not the steady one"
        )
    args = parser.parse_args()
    plan = pipeline.Plan(args.images, args.side, args.group)
    return args, plan, multiprocessing.get_context(args.start_method), max(1, args.repeat)


def _measure(
    args: argparse.Namespace, plan: Any, context: Any, repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], np.ndarray]:
    """(seconds of each variant per round, of each pass taken in turns, polystore's result).

    Round after round, polystore's variants on fresh registries and pools,
    each ideal, no-hand-off and floor pass on its pool that stays up, the
    ideal's right after polystore's first and second passes: a change in
    the machine's speed meanwhile weighs on all alike.
    """
    rounds: dict[str, list[float]] = {}

    def note(name: str, *seconds: float) -> None:
        for i, value in enumerate(seconds):
            rounds.setdefault(f"{name}{i}", []).append(value)

    with contextlib.ExitStack() as stack:
        standing = _standing(stack, plan, args.workers, context)
        for _ in range(repeat):
            *times, final = polystore_runs(plan, args.workers, context, 1, True)
            note("prepared", *times)
            note("ideal", _seconds(standing["ideal"]))
            note("bare", *polystore_runs(plan, args.workers, context, 1, False)[:3])
            note("executor", *polystore_runs(plan, args.workers, context, 1, True, True)[:3])
            note("no_handoff", _seconds(standing["no_handoff"]))
            note("floor", _seconds(standing["floor"]))
        turns = interleaved(plan, args.workers, context, args.cycles, standing)
    return rounds, turns, final


def main() -> None:
    args, plan, context, repeat = parse_run(__doc__.splitlines()[0], cycles=True)
    rounds, turns, final = _measure(args, plan, context, repeat)
    med = {name: statistics.median(times) for name, times in rounds.items()}
    cold, ours, setup = med["prepared0"], med["prepared1"], med["prepared2"]
    bare_cold, bare, bare_setup = med["bare0"], med["bare1"], med["bare2"]
    executor_cold, executor = med["executor0"], med["executor1"]
    ideal, no_handoff, floor = med["ideal0"], med["no_handoff0"], med["floor0"]
    with context.Manager() as manager_process:
        backend = MemoryBackend(shared_dict=manager_process.dict(), store=None)
        manager_cold, manager, final_m = two_passes(
            FileManagerFactory({"memory": backend}), plan, args.workers, context, []
        )
    assert np.array_equal(final, final_m), "both pipelines must compute the same result"

    gib = plan.moved_bytes / 2**30
    print(
        f"{plan.images} images of {args.side}x{args.side} float32, {plan.handoffs} hand-offs, "
        f"{gib:.2f} GiB moved, {args.workers} workers ({args.start_method}); "
        f"polystore and ideal: medians of {repeat}"
    )
    print(f"{'method':40}{'seconds':>9}{'MB/s':>9}{'vs ideal':>10}   per round vs its ideal")
    for label, seconds, name in [
        ("polystore, first pass (as the example)", cold, "prepared0"),
        ("polystore, second pass (steady)", ours, "prepared1"),
        ("  without reserve()/premap: 1st pass", bare_cold, "bare0"),
        ("  without reserve()/premap: 2nd pass", bare, "bare1"),
        ("  on ProcessPoolExecutor: 1st pass", executor_cold, "executor0"),
        ("  on ProcessPoolExecutor: 2nd pass", executor, "executor1"),
        ("Manager().dict(), first pass", manager_cold, None),
        ("Manager().dict(), second pass", manager, None),
        ("same tasks, no hand-off (steady)", no_handoff, "no_handoff0"),
        ("  the same in shared memory (floor)", floor, "floor0"),
        ("ideal: the compute alone", ideal, None),
    ]:
        rate = plan.moved_bytes / seconds / 1e6
        # The machine's speed drifts between rounds: each round's ratio to
        # the ideal timed in the same round shows how far that reaches.
        spread = ""
        if name is not None and repeat > 1:
            ratios = [t / i for t, i in zip(rounds[name], rounds["ideal0"], strict=True)]
            low, mid, high = min(ratios), statistics.median(ratios), max(ratios)
            spread = f"   median {mid:.2f}x, {low:.2f}x to {high:.2f}x"
        print(f"{label:40}{seconds:9.2f}{rate:9.0f}{seconds / ideal:9.2f}x{spread}")
    print(
        f"first pass: polystore is {manager_cold / cold:.1f}x faster than Manager().dict() "
        f"(target >= 20x) and takes {cold / ideal:.2f}x the ideal time (target <= 1.25x); "
        f"steady: {manager / ours:.1f}x faster and {ours / ideal:.2f}x the ideal "
        "(target <= 1.05x)"
    )
    print(
        f"hand-offs' share: polystore's steady pass takes {ours / no_handoff:.2f}x the same "
        f"tasks with no hand-off; that schedule takes {no_handoff / ideal:.2f}x the ideal; "
        f"in shared memory {floor / ideal:.2f}x (the floor of any hand-off through it: "
        f"polystore takes {ours / floor:.2f}x that)"
    )
    print(
        f"set-up before the clock (reserve + pool start): {setup:.2f} s as the example, "
        f"{bare_setup:.2f} s without reserve()/premap"
    )
    each = ", ".join(f"{name} {statistics.median(t):.3f} s" for name, t in turns.items())
    print(f"steady passes taken in turns, {args.cycles} cycles ({each}; ratios within a cycle):")
    for label, top, bottom in [
        ("polystore / ideal", "polystore", "ideal"),
        ("floor / ideal", "floor", "ideal"),
        ("polystore / floor", "polystore", "floor"),
        ("polystore / B (A/A)", "polystore", "polystore B"),
    ]:
        ratios = sorted(t / u for t, u in zip(turns[top], turns[bottom], strict=True))
        quarter = len(ratios) // 4
        print(
            f"  {label:19} median {statistics.median(ratios):.2f}x, middle half "
            f"{ratios[quarter]:.2f}x to {ratios[-1 - quarter]:.2f}x, "
            f"all {ratios[0]:.2f}x to {ratios[-1]:.2f}x"
        )
    handoff = handoff_seconds(512 << 20, context, repeat)
    for case, label in [
        ("cold", "hand-off of a 512 MB result made in place"),
        ("warm", "  the same, nothing written (warm caches)"),
        ("floor", "  floor after the same writes: flock; array"),
    ]:
        publish, view = handoff[case]
        print(
            f"{label}: publish {publish * 1e6:.0f} us + get in another process "
            f"{view * 1e6:.0f} us = {(publish + view) * 1e6:.0f} us"
            + (" (target < 50 us)" if case == "cold" else "")
        )


def _viewer(store: polystore.SharedArrayStore, conn: Any) -> None:
    """A long-lived consumer: for each key it is sent, time its get.

    Sent ``""`` instead, it times the floor of a get: making an array object
    over memory that is already mapped, with nothing looked up or pinned.
    """
    mapped = bytearray(4096)
    while True:
        key = conn.recv()
        if key is None:
            break
        start = time.perf_counter()
        view = store.get(key) if key else np.frombuffer(mapped, np.float32)
        conn.send(time.perf_counter() - start)
        del view
    store.close()


def handoff_seconds(nbytes: int, context: Any, repeat: int) -> dict[str, tuple[float, float]]:
    """Publish and get-in-another-process times of a value made in place: medians after warm-up.

    The producer fills the array inside ``create``; the clock covers only
    leaving the block (publishing it) and, in a consumer process that runs
    all along (as a pipeline's workers do), the ``get``. Three cases:
    ``"cold"``, right after the producer wrote the whole value (every cache
    flushed, as in a pipeline); ``"warm"``, the same with nothing written;
    and ``"floor"``, after the same writes, the least any hand-off between
    processes does: one lock and unlock of a file (``flock``) by the
    producer, one array object over mapped memory made by the consumer.
    """
    times: dict[str, tuple[list[float], list[float]]] = {
        case: ([], []) for case in ("cold", "warm", "floor")
    }
    with polystore.SharedArrayStore() as store, tempfile.TemporaryFile() as lockfile:
        ours, theirs = context.Pipe()
        child = context.Process(target=_viewer, args=(store, theirs))
        child.start()
        try:
            for i in range(repeat + 3):
                for case, (publish, view) in times.items():
                    key = f"{case}{i}"
                    with store.create(key, nbytes // 4, np.float32) as out:
                        if case != "warm":
                            out.fill(i)
                        start = time.perf_counter()
                        if case == "floor":
                            fcntl.flock(lockfile, fcntl.LOCK_EX)
                            fcntl.flock(lockfile, fcntl.LOCK_UN)
                            publish.append(time.perf_counter() - start)
                    if case != "floor":
                        publish.append(time.perf_counter() - start)
                    ours.send("" if case == "floor" else key)
                    view.append(ours.recv())
                    del out
                    store.delete(key)
        finally:
            ours.send(None)
            child.join()
    med = statistics.median
    return {case: (med(p[2:]), med(v[2:])) for case, (p, v) in times.items()}


if __name__ == "__main__":
    main()
