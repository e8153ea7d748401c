"""A three-stage parallel image pipeline whose workers exchange arrays through polystore.

Stage 1 generates synthetic images, stage 2 smooths each one, stage 3 reduces
groups of smoothed images to a maximum projection. Every stage runs on a pool
of worker processes (``StagePool``, a few lines over two pipes; a
``ProcessPoolExecutor`` works too, at more cost per task) and computes
straight into the shared memory of its output (``FileManager.create_array``);
images travel between stages (and back to the parent) through the shared
``memory`` backend, so no array is pickled, and none is copied. The same
pipeline then runs through a ``multiprocessing.Manager().dict()`` for
comparison, and the last line reports both throughputs.

Run ``python examples/pipeline.py --help`` for the sizes; the defaults move
2.12 GiB of arrays (136 hand-offs of 16 MiB images) through two workers.
``--max-bytes`` caps the shared memory (a container's ``/dev/shm``, say): the
pipeline then keeps few enough images in flight and waits for room when it
must; ``--spill-dir`` sends what does not fit to disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

import polystore
from polystore import FileManager, FileManagerFactory, MemoryBackend


@dataclass(frozen=True)
class Plan:
    """What to compute: ``images`` square float32 images of ``side`` pixels.

    ``timeout``: how long a stage waits for room in shared memory when it is
    full (0: not at all), so that producers keep to the consumers' pace.
    """

    images: int
    side: int
    group: int
    timeout: float | None = 0.0

    @property
    def image_bytes(self) -> int:
        return self.side * self.side * 4

    @property
    def handoffs(self) -> int:
        """Arrays saved by one stage and loaded by the next (or by the parent)."""
        return 2 * self.images + self.images // self.group

    @property
    def moved_bytes(self) -> int:
        return self.handoffs * self.image_bytes

    def working_set(self, window: int) -> int:
        """Bytes of images alive at once: ``window`` generated, as many smoothed, a group."""
        return (2 * window + self.group) * self.image_bytes


def reserve(registry: Any, plan: Plan, workers: int, window: int | None = None) -> None:
    """Have the pipeline's working set of shared memory ready before the clock starts.

    Fresh shared memory costs a page fault per 4 KiB on first touch; reserving
    it now keeps that cost out of the pipeline's first pass, and a factory
    made with ``premap=True`` has each worker map it as it starts. This
    process maps it too, since it reads every projection (otherwise about
    1,800 page faults and 8 ms of its CPU a pass, taken from the workers).
    """
    store = registry["memory"].array_store
    stats = store.stats()
    limit = min(stats["cache_bytes"], stats["max_bytes"] or stats["cache_bytes"])
    want = min(plan.working_set(4 * workers if window is None else window), limit)
    if want >= plan.image_bytes:
        store.reserve(want, plan.image_bytes)
        store.map_all()


def shortfall(registry: Any, plan: Plan, workers: int) -> str | None:
    """Why the shared memory left cannot hold what the pipeline keeps in flight, or None.

    A container's ``/dev/shm`` is 64 MB unless told otherwise: the default
    sizes need several times that, and would stop with ``ShmFullError``
    partway through.
    """
    directory = registry["memory"].array_store.directory
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    need = plan.working_set(4 * workers) + (4 << 20)  # and the paths' keys
    if free >= need:
        return None
    return (
        f"shared memory in {directory} has {free >> 20} MB free and this pipeline keeps up to "
        f"{need >> 20} MB in flight: give --max-bytes (fewer images in flight, waiting for "
        "room; --side 1024 --group 2 --max-bytes 48 fits a container's 64 MB), --spill-dir, "
        "or more shared memory (docker run --shm-size=1g)"
    )


def bounded_window(plan: Plan, max_bytes: int, workers: int) -> int:
    """The most images in flight whose working set fits in ``max_bytes`` (0: none fits).

    One image's worth (at least 4 MiB: small values share segments of about
    that size) is left for the paths and metadata the backends keep in
    shared memory too. A pool whose tasks all wait for room that only a
    queued task could free would wait until the timeout: this keeps the
    pipeline's needs within reach.
    """
    # In flight at worst: ``window`` images being generated and as many being
    # smoothed, a group being projected and its output, and the next group
    # filling up meanwhile.
    usable = max_bytes - max(plan.image_bytes, 4 << 20)
    fits = (usable // plan.image_bytes - 2 * plan.group - 1) // 2
    return max(0, min(4 * workers, fits))


# -- the stages: plain functions of a FileManager and a path -------------------
# Each stage computes straight into its output's shared memory
# (``fm.create_array``): the array is published at its path when the ``with``
# block ends, with no copy, and the next stage reads it in place.


def generate(fm: FileManager, index: int, side: int, timeout: float | None = 0) -> str:
    """Stage 1: a flat image with a bright square that moves with ``index``."""
    path = f"raw/{index:05d}.npy"
    shape = (side, side)
    with fm.create_array(path, shape, np.float32, backend="memory", timeout=timeout) as image:
        image.fill(0.1 * (index % 7))
        corner = (index * 37) % (side // 2)
        image[corner : corner + side // 8, corner : corner + side // 8] = 4.0
    return path


def smooth(fm: FileManager, path: str, timeout: float | None = 0) -> str:
    """Stage 2: a two-tap horizontal box filter (sum of neighbours) of the image at ``path``."""
    image = fm.load(path, backend="memory")  # a read-only view, no copy
    target = path.replace("raw/", "smooth/")
    shape = image.shape
    with fm.create_array(target, shape, np.float32, backend="memory", timeout=timeout) as out:
        np.add(image[:, 1:], image[:, :-1], out=out[:, 1:])
        np.add(image[:, 0], image[:, 0], out=out[:, 0])
    del image
    fm.delete(path, backend="memory")
    return target


def project(fm: FileManager, paths: Sequence[str], index: int, timeout: float | None = 0) -> str:
    """Stage 3: the maximum over a group of smoothed images."""
    first = fm.load(paths[0], backend="memory")
    target = f"projections/{index:05d}.npy"
    shape = first.shape
    with fm.create_array(target, shape, np.float32, backend="memory", timeout=timeout) as result:
        np.copyto(result, first)
        for path in paths[1:]:
            np.maximum(result, fm.load(path, backend="memory"), out=result)
    del first
    for path in paths:
        fm.delete(path, backend="memory")
    return target


# -- task wrappers: each worker uses its own FileManager -------------------------
def _generate_task(args: tuple[int, int, float | None]) -> str:
    return generate(polystore.current_filemanager(), *args)


def _smooth_task(args: tuple[str, float | None]) -> str:
    return smooth(polystore.current_filemanager(), *args)


def _project_task(args: tuple[list[str], int, float | None]) -> str:
    return project(polystore.current_filemanager(), *args)


# -- the workers ---------------------------------------------------------------
# A task here is a function and a path or two: the arrays never travel with
# it. ProcessPoolExecutor spends about 0.3 ms of the parent's CPU on each
# task (its queue-feeding and result threads, futures, wakeups), which on two
# cores is taken from the workers (benchmarks/pipeline.py runs the pipeline
# on both: its first pass took 1.26x to 2.23x its compute alone there, 1.14x
# to 1.46x here). These workers read their tasks from one pipe and answer on
# another: the parent spends about 40 us of CPU a task.


def _serve(
    initializer: Callable[[], None] | None,
    tasks: Connection,
    task_lock: Any,
    results: Connection,
    result_lock: Any,
) -> None:
    """A worker's loop: run the initializer, say so, then run tasks until told to stop."""
    try:
        if initializer is not None:
            initializer()
        reply: tuple[int, bool, Any] = (-1, True, None)
    except BaseException as exc:  # reported to the parent, which raises it
        reply = (-1, False, _shippable(exc))
    _reply(results, result_lock, reply)
    if not reply[1]:
        return
    while True:
        with task_lock:
            task = tasks.recv()
        if task is None:
            return
        token, function, args = task
        try:
            reply = (token, True, function(args))
        except BaseException as exc:  # reported to the parent, which raises it
            reply = (token, False, _shippable(exc))
        _reply(results, result_lock, reply)


def _reply(results: Connection, lock: Any, reply: tuple[int, bool, Any]) -> None:
    # send() pickles before it writes: a value that does not pickle leaves
    # the pipe as it was, and the parent gets an error in its place.
    with lock:
        try:
            results.send(reply)
        except Exception as exc:
            problem = RuntimeError(f"a task's result could not be sent back: {exc!r}")
            results.send((reply[0], False, problem))


def _shippable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        text = "".join(traceback.format_exception(exc))
        return RuntimeError(f"a task failed in a worker:\n{text}")
    return exc


class StagePool:
    """``workers`` processes that run tasks in the order given and report as they finish.

    ``initializer`` runs in each worker before its first task (a
    :class:`~polystore.FileManagerFactory`'s, say); the pool is ready when
    every worker has run it. :meth:`submit` hands a task to the first free
    worker; :meth:`next_result` returns the next task to finish. An
    exception in a task is raised by :meth:`next_result`; a worker that dies
    raises ``RuntimeError`` there instead of leaving the parent waiting.
    """

    def __init__(
        self, workers: int, context: Any, initializer: Callable[[], None] | None = None
    ) -> None:
        self._take, self._tasks = context.Pipe(duplex=False)
        self._results, self._answer = context.Pipe(duplex=False)
        self._task_lock, self._result_lock = context.Lock(), context.Lock()
        self._next = 0
        self._procs = [
            context.Process(
                target=_serve,
                args=(initializer, self._take, self._task_lock, self._answer, self._result_lock),
                daemon=True,
            )
            for _ in range(workers)
        ]
        try:
            for proc in self._procs:
                proc.start()
            for _ in self._procs:
                self.next_result()  # each worker's "ready"
        except BaseException:
            self.close()
            raise

    def submit(self, function: Callable[[Any], Any], args: Any) -> int:
        """Queue ``function(args)``; return the number :meth:`next_result` will report it by."""
        self._next += 1
        self._tasks.send((self._next, function, args))
        return self._next

    def next_result(self) -> tuple[int, Any]:
        """(number, value) of the next task to finish; raise what it raised."""
        sentinels = [proc.sentinel for proc in self._procs]
        while not self._results.poll():
            if any(s in sentinels for s in wait([self._results, *sentinels])):
                if self._results.poll():  # it answered before it ended
                    break
                codes = [proc.exitcode for proc in self._procs]
                raise RuntimeError(f"a worker of the pool ended (exit codes {codes})")
        token, ok, value = self._results.recv()
        if not ok:
            raise value
        return token, value

    def close(self) -> None:
        """Stop the workers (after their current task) and wait for them."""
        for proc in self._procs:
            if proc.is_alive():
                self._tasks.send(None)
        for proc in self._procs:
            if proc.pid is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
        for conn in (self._take, self._tasks, self._results, self._answer):
            conn.close()

    def __enter__(self) -> StagePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Progress:
    """tqdm when it is installed, a plain text line otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc="images", unit="img", leave=False)
            except ImportError:
                pass

    def step(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled:
            print(f"\rimages: {self.done}/{self.total}", end="", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print()


def stream(
    pool: StagePool, fm: FileManager, plan: Plan, window: int, progress: bool = True
) -> np.ndarray:
    """Push every image through the three stages, keeping at most ``window`` in flight.

    An image is smoothed as soon as it is generated and a group is projected as
    soon as its last image is smoothed, so the stages overlap and the memory of
    finished images is recycled for new ones. The parent folds each projection
    into the overall maximum as it arrives, reading it in place, and deletes
    it: the memory in use stays bounded whatever the number of images.
    """
    bar = _Progress(plan.images, progress)
    running: dict[int, tuple[str, int]] = {}
    smoothed: dict[int, list[str]] = {}
    final: np.ndarray | None = None
    next_image = 0

    def submit_generate() -> None:
        nonlocal next_image
        task = pool.submit(_generate_task, (next_image, plan.side, plan.timeout))
        running[task] = ("generate", next_image)
        next_image += 1

    while next_image < min(window, plan.images):
        submit_generate()
    while running:
        task, path = pool.next_result()
        stage, index = running.pop(task)
        if stage == "generate":
            running[pool.submit(_smooth_task, (path, plan.timeout))] = ("smooth", index)
        elif stage == "smooth":
            group = smoothed.setdefault(index // plan.group, [])
            group.append(path)
            last = min(plan.images, (index // plan.group + 1) * plan.group)
            if len(group) == last - (index // plan.group) * plan.group:
                args = (sorted(group), index // plan.group, plan.timeout)
                running[pool.submit(_project_task, args)] = ("project", len(group))
            if next_image < plan.images:
                submit_generate()
        else:
            projection = fm.load(path, backend="memory")
            if final is None:
                final = np.array(projection)
            else:
                np.maximum(final, projection, out=final)
            del projection
            fm.delete(path, backend="memory")
            bar.step(index)
    bar.close()
    assert final is not None
    return final


def run_pipeline(
    factory: FileManagerFactory,
    plan: Plan,
    workers: int,
    context: Any,
    progress: bool = True,
    window: int | None = None,
) -> tuple[float, np.ndarray]:
    """Run the pipeline on a fresh pool; return the wall time and the overall projection.

    The time runs from the first task to the result in the parent; starting
    the pool's processes (and their ``factory.initializer``) is not included.
    """
    with StagePool(workers, context, factory.initializer) as pool:
        start = time.perf_counter()
        window = 4 * workers if window is None else window
        final = stream(pool, factory(), plan, window=window, progress=progress)
        elapsed = time.perf_counter() - start
    return elapsed, final


def run_with_manager(plan: Plan, workers: int, context: Any) -> tuple[float, np.ndarray]:
    """The same pipeline through a ``Manager().dict()``: every array is pickled twice."""
    with context.Manager() as manager:
        backend = MemoryBackend(shared_dict=manager.dict(), store=None)
        factory = FileManagerFactory({"memory": backend})
        return run_pipeline(factory, plan, workers, context, progress=False)


def build_parser() -> argparse.ArgumentParser:
    """The command line, with the defaults the module docstring describes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to generate (64)")
    parser.add_argument("--side", type=int, default=2048, help="image side in pixels (2048)")
    parser.add_argument("--group", type=int, default=8, help="images per projection (8)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--start-method", default="forkserver", choices=["fork", "spawn", "forkserver"]
    )
    parser.add_argument(
        "--compare-fraction",
        type=float,
        default=0.25,
        help="share of the images to run through Manager().dict() for comparison (0 skips it)",
    )
    parser.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="cap on the shared memory, in MB (a container's /dev/shm, say): the pipeline "
        "keeps few enough images in flight and waits for room when it must",
    )
    parser.add_argument(
        "--spill-dir",
        default=None,
        help="a directory on disk for images that do not fit in shared memory",
    )
    parser.add_argument(
        "--shm-dir",
        default=None,
        help="where the shared memory lives (default: /dev/shm, or $POLYSTORE_SHM_DIR)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.side < 16 or args.group < 1 or args.workers < 1:
        parser.error("--images, --group and --workers must be >= 1 and --side >= 16")
    context = multiprocessing.get_context(args.start_method)
    plan = Plan(args.images, args.side, args.group)
    if args.shm_dir is not None:
        os.environ["POLYSTORE_SHM_DIR"] = args.shm_dir  # the workers inherit it too
    max_bytes = None if args.max_bytes is None else int(args.max_bytes * 2**20)
    window = None
    if max_bytes is not None:
        window = bounded_window(plan, max_bytes, args.workers)
        if window == 0 and args.spill_dir is None:
            parser.error(
                f"one group of {args.group} images of {plan.image_bytes / 2**20:.0f} MB does not "
                "fit in --max-bytes: give a --spill-dir, or a smaller --group or --side"
            )
        # Wait for room rather than fail: consumers free it as they go.
        plan = Plan(args.images, args.side, args.group, timeout=120.0)

    with polystore.shared_registry(max_bytes=max_bytes, spill_dir=args.spill_dir) as registry:
        short = None if max_bytes or args.spill_dir else shortfall(registry, plan, args.workers)
        if short:
            parser.error(short)
        reserve(registry, plan, args.workers, window or None)
        # Each worker maps the reserved memory while it starts, not in its first task.
        factory = FileManagerFactory(registry, premap=True)
        elapsed, final = run_pipeline(
            factory, plan, args.workers, context, not args.no_progress, window or None
        )

    rate = plan.moved_bytes / elapsed / 1e6
    print(
        f"polystore: {plan.handoffs} hand-offs, {plan.moved_bytes / 2**30:.2f} GiB of arrays "
        f"through {args.workers} workers in {elapsed:.2f} s ({rate:,.0f} MB/s); "
        f"projection max {final.max():.3f}"
    )
    if max_bytes is not None:
        where = f", what does not fit spilled to {args.spill_dir}" if args.spill_dir else ""
        print(
            f"shared memory capped at {max_bytes / 2**20:.0f} MB: at most "
            f"{window or 4 * args.workers} images in flight{where}"
        )
    if args.compare_fraction > 0:
        small = Plan(
            max(args.group, int(args.images * args.compare_fraction)), args.side, args.group
        )
        m_elapsed, _ = run_with_manager(small, args.workers, context)
        m_rate = small.moved_bytes / m_elapsed / 1e6
        print(
            f"Manager().dict(): {small.moved_bytes / 2**30:.2f} GiB in {m_elapsed:.2f} s "
            f"({m_rate:,.0f} MB/s); polystore moved arrays {rate / m_rate:.1f}x faster"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
