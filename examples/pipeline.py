"""A three-stage parallel image pipeline whose workers exchange arrays through polystore.

Stage 1 generates synthetic images, stage 2 smooths each one, stage 3 reduces
groups of smoothed images to a maximum projection. Every stage runs on a
``ProcessPoolExecutor``; images travel between stages (and back to the parent)
through the shared ``memory`` backend, so no array is pickled. The same
pipeline then runs through a ``multiprocessing.Manager().dict()`` for
comparison, and the last line reports both throughputs.

Run ``python examples/pipeline.py --help`` for the sizes; the defaults move
just over 1 GiB of arrays through two workers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

import polystore
from polystore import FileManager, FileManagerFactory, MemoryBackend


@dataclass(frozen=True)
class Plan:
    """What to compute: ``images`` square float32 images of ``side`` pixels."""

    images: int
    side: int
    group: int

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


# -- the stages: plain functions of a FileManager and a path -------------------
def generate(fm: FileManager, index: int, side: int) -> str:
    """Stage 1: a gradient image with a bright square that moves with ``index``."""
    image = np.empty((side, side), dtype=np.float32)
    image[:] = np.linspace(0.0, 1.0, side, dtype=np.float32)
    corner = (index * 37) % (side // 2)
    image[corner : corner + side // 8, corner : corner + side // 8] += 4.0
    path = f"raw/{index:05d}.npy"
    fm.save(image, path, backend="memory")
    return path


def smooth(fm: FileManager, path: str) -> str:
    """Stage 2: a two-pixel horizontal average of the image at ``path``."""
    image = fm.load(path, backend="memory")  # a read-only view, no copy
    out = np.empty_like(image)
    np.add(image[:, 1:], image[:, :-1], out=out[:, 1:])
    np.add(image[:, 0], image[:, 0], out=out[:, 0])
    out *= 0.5
    target = path.replace("raw/", "smooth/")
    fm.save(out, target, backend="memory")
    fm.delete(path, backend="memory")
    return target


def project(fm: FileManager, paths: Sequence[str], index: int) -> str:
    """Stage 3: the maximum over a group of smoothed images."""
    result = fm.load(paths[0], backend="memory").copy()
    for path in paths[1:]:
        np.maximum(result, fm.load(path, backend="memory"), out=result)
    for path in paths:
        fm.delete(path, backend="memory")
    target = f"projections/{index:05d}.npy"
    fm.save(result, target, backend="memory")
    return target


# -- task wrappers: each worker uses its own FileManager -------------------------
def _generate_task(args: tuple[int, int]) -> str:
    return generate(polystore.current_filemanager(), *args)


def _smooth_task(path: str) -> str:
    return smooth(polystore.current_filemanager(), path)


def _project_task(args: tuple[list[str], int]) -> str:
    return project(polystore.current_filemanager(), *args)


class _Progress:
    """tqdm when it is installed, a plain text line otherwise."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="img", leave=False)
            except ImportError:
                pass

    def step(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update()
        elif self.enabled and (self.done == self.total or self.done % 16 == 0):
            print(f"\r{self.label}: {self.done}/{self.total}", end="", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print()


def _run_stage(
    pool: Executor, fn: Callable[[Any], str], items: Iterable[Any], label: str, progress: bool
) -> list[str]:
    items = list(items)
    bar = _Progress(len(items), label, progress)
    out = []
    for path in pool.map(fn, items):
        out.append(path)
        bar.step()
    bar.close()
    return out


def run_pipeline(
    factory: FileManagerFactory, plan: Plan, workers: int, context: Any, progress: bool = True
) -> tuple[float, np.ndarray]:
    """Run the three stages; return the wall time and the overall projection."""
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=factory.initializer) as pool:
        raw = _run_stage(
            pool, _generate_task, [(i, plan.side) for i in range(plan.images)], "generate", progress
        )
        smoothed = _run_stage(pool, _smooth_task, raw, "smooth", progress)
        groups = [
            (smoothed[i : i + plan.group], i // plan.group)
            for i in range(0, len(smoothed), plan.group)
        ]
        projections = _run_stage(pool, _project_task, groups, "project", progress)
    fm = factory()
    final = np.max([fm.load(p, backend="memory") for p in projections], axis=0)
    elapsed = time.perf_counter() - start
    for path in projections:
        fm.delete(path, backend="memory")
    return elapsed, final


def run_with_manager(plan: Plan, workers: int, context: Any) -> tuple[float, np.ndarray]:
    """The same pipeline through a ``Manager().dict()``: every array is pickled twice."""
    with context.Manager() as manager:
        backend = MemoryBackend(shared_dict=manager.dict(), store=None)
        factory = FileManagerFactory({"memory": backend})
        return run_pipeline(factory, plan, workers, context, progress=False)


def main(argv: Sequence[str] | None = None) -> int:
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
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.images < 1 or args.side < 16 or args.group < 1 or args.workers < 1:
        parser.error("--images, --group and --workers must be >= 1 and --side >= 16")
    context = multiprocessing.get_context(args.start_method)
    plan = Plan(args.images, args.side, args.group)

    with polystore.shared_registry() as registry:
        factory = FileManagerFactory(registry)
        elapsed, final = run_pipeline(factory, plan, args.workers, context, not args.no_progress)
    rate = plan.moved_bytes / elapsed / 1e6
    print(
        f"polystore: {plan.handoffs} hand-offs, {plan.moved_bytes / 2**30:.2f} GiB of arrays "
        f"through {args.workers} workers in {elapsed:.2f} s ({rate:,.0f} MB/s); "
        f"projection max {final.max():.3f}"
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
