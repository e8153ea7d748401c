"""The three-stage image pipeline of ``pipeline.py`` on a Dask ``LocalCluster``.

Stage 1 generates synthetic images, stage 2 smooths each one, stage 3 reduces
groups of smoothed images to a maximum projection. Each stage is a Dask task;
stage 2 is pinned to another worker process than stage 1, so that every image
crosses from one process to another, as it would on a busy cluster.

It runs twice on the same cluster: first with the arrays passed through shared
memory (:func:`polystore.dask.shared_result`: a task returns a small handle,
the next one reads a zero-copy view), then as plain Dask results (pickled and
sent over the worker-to-worker connection). The last two lines report both
throughputs. Intermediate images are freed as Dask forgets their keys.

Run ``python examples/dask_pipeline.py --help`` for the sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import polystore.dask as psd
from polystore import ShmFullError


def generate(index: int, side: int) -> np.ndarray[Any, Any]:
    """Stage 1: a flat image with a bright square that moves with ``index``."""
    image = np.full((side, side), 0.1 * (index % 7), dtype=np.float32)
    corner = (index * 37) % (side // 2)
    image[corner : corner + side // 8, corner : corner + side // 8] = 4.0
    return image


def smooth(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Stage 2: a two-tap horizontal box filter (sum of neighbours)."""
    out = np.empty_like(image)
    np.add(image[:, 1:], image[:, :-1], out=out[:, 1:])
    np.add(image[:, 0], image[:, 0], out=out[:, 0])
    return out


def project(*images: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Stage 3: the maximum over a group of smoothed images."""
    result = images[0].copy()
    for image in images[1:]:
        np.maximum(result, image, out=result)
    return result


# The same stages, passing arrays through shared memory: each returns a handle,
# and each reads the handles it is given as views.
@psd.shared_result
def generate_shared(index: int, side: int) -> np.ndarray[Any, Any]:
    return generate(index, side)


@psd.shared_result
def smooth_shared(image: psd.SharedArray) -> np.ndarray[Any, Any]:
    return smooth(image.get())


@psd.shared_result
def project_shared(*images: psd.SharedArray) -> np.ndarray[Any, Any]:
    return project(*(image.get() for image in images))


def as_array(value: Any) -> np.ndarray[Any, Any]:
    return value.get() if isinstance(value, psd.SharedArray) else np.asarray(value)


def run(
    client: Any,
    stages: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]],
    images: int,
    side: int,
    group: int,
    progress: bool,
) -> tuple[float, float]:
    """Run the pipeline once; return (seconds, maximum of the projections)."""
    first, second = sorted(client.scheduler_info()["workers"])[:2]
    make, filter_, reduce_ = stages
    start = time.perf_counter()
    smoothed = []
    for i in range(images):
        raw = client.submit(make, i, side, workers=[first], pure=False)
        smoothed.append(client.submit(filter_, raw, workers=[second], pure=False))
        del raw  # Dask frees the image once stage 2 has read it
    projections = [
        client.submit(reduce_, *smoothed[i : i + group], pure=False)
        for i in range(0, images - images % group, group)
    ]
    del smoothed
    if progress:
        from distributed import progress as show

        show(projections)
        print()
    peak = max(float(as_array(p).max()) for p in client.gather(projections))
    return time.perf_counter() - start, peak


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to generate (64)")
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--group", type=int, default=4, help="images per projection (4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _both(args: argparse.Namespace) -> tuple[float, float, float, float]:
    """(polystore s, plain Dask s, and each one's peak) on one local cluster."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # any free port: clusters run side by side
            worker_dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        psd.install(client)
        shared = (generate_shared, smooth_shared, project_shared)
        plain = (generate, smooth, project)
        sizes = (args.images, args.side, args.group, not args.no_progress)
        ours, peak = run(client, shared, *sizes)
        theirs, plain_peak = run(client, plain, *sizes)
    return ours, theirs, peak, plain_peak


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("images", "side", "group"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.side < 8:
        parser.error("--side must be at least 8")
    if args.group > args.images:
        parser.error("--group must not exceed --images")

    hand_offs = 2 * args.images + args.images // args.group
    mib = hand_offs * args.side * args.side * 4 / 2**20
    try:
        ours, theirs, peak, plain_peak = _both(args)
    except ShmFullError as exc:
        # A container's /dev/shm is 64 MB unless told otherwise.
        print(
            f"{exc}: give shared memory more room (docker run --shm-size=1g), "
            "or use fewer or smaller images (--images, --side)",
            file=sys.stderr,
        )
        return 1
    if plain_peak != peak:
        print(f"the two runs disagree: {peak} != {plain_peak}", file=sys.stderr)
        return 1
    print(
        f"polystore: {hand_offs} hand-offs ({mib:.1f} MiB) in {ours:.2f} s, "
        f"{mib / ours:.0f} MiB/s; projection max {peak:.3f}"
    )
    ratio = theirs / ours
    verdict = (
        f"polystore {ratio:.1f}x faster" if ratio >= 1 else f"polystore {1 / ratio:.1f}x slower"
    )
    print(f"plain Dask results: {theirs:.2f} s, {mib / theirs:.0f} MiB/s; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
