"""Handing a numpy array from one process to another: polystore and its peers.

Run: ``python benchmarks/exchange.py`` (about 3 minutes; ``--quick`` for a
smaller run, ``--help`` for the options).

A producer process (this one) hands float32 arrays of 8 KB, 1 MB, 64 MB and
512 MB to a consumer process, repeatedly, with each method in turn:

* ``SharedArrayStore``: ``put`` in the producer, ``get`` (a read-only view) in
  the consumer;
* the same store with no room in shared memory, so that every value spills
  to a file-backed mapping in a temporary directory on disk (``spill_dir``):
  the cost of spilling against ``/dev/shm``;
* ``Manager().dict()``: ``d[key] = array`` / ``d[key]``;
* ``MemoryBackend(shared_dict=Manager().dict())``, the spec's shared-dict
  backend with its default ``store``: ``save`` / ``load`` of a ``.npy`` file,
  where an array of 64 KiB or more goes into a store the backend made and the
  dict holds a reference (at 8 KB the array itself goes through the dict);
* ``multiprocessing.Queue``: ``q.put(array)`` / ``q.get()``;
* a fresh ``multiprocessing.shared_memory.SharedMemory`` per array, filled by
  the producer and attached (zero-copy view) by the consumer;
* ``np.save`` into ``/dev/shm`` and ``np.load(mmap_mode="r")``;
* Ray's object store (``ray.put`` / ``ray.get``), when Ray is installed;
* a *floor* for reference, not a store: one ``flock`` round trip around a
  copy into a buffer mapped once, and a bare ``np.frombuffer`` view for the
  reader. No index, no pins, no checks: what any store that several processes
  may write must at least pay, measured under the same conditions.

One hand-off: the producer times its put, tells the consumer over a pipe,
the consumer times its get, drops what it got and replies. *put + get* adds the
two timings (signalling left out); *end to end* runs from the start of the put
to the end of the get on the system-wide monotonic clock, signalling included.
For the queue, whose ``put`` only hands the array to a feeder thread, only end
to end means anything, and it is used as its put + get. The consumer touches
none of the data: a view costs nothing until it is read, whichever method
made it. Reported numbers are medians after warm-up (steady state).

Every time is also given as a ratio to one ``np.copyto`` of the same array
into an already-mapped buffer: the memcpy limit. The producer times one right
after each hand-off, so each method meets the reference under its own
conditions (cache state, load of the machine). For polystore the consumer
also times a second ``get`` of the same value (*get2*, warm caches). The first
``get`` of a hand-off runs cold: the consumer slept in ``recv`` while the
producer worked, and a process that slept for milliseconds runs its first
~100 us of any work slowly (caches flushed by the producer's copy or by the
idle CPU), which is what the 64 MB and 512 MB ``get`` columns show.
With ``--awake`` both processes spin on the pipe instead of sleeping in
``recv``, which shows how much of that is the cost of waking up.
Last, the peak RSS of a 512 MB put and get shows whether any hidden temporary
copy is made. The plot goes to ``docs/_static/exchange.png``.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from polystore import MemoryBackend, SharedArrayStore

SIZES = [8 << 10, 1 << 20, 64 << 20, 512 << 20]
PLOT = Path(__file__).resolve().parent.parent / "docs" / "_static" / "exchange.png"
#: (size limit, maximum repetitions) of a normal run; --quick divides them
REPS = [(8 << 10, 3000), (1 << 20, 400), (64 << 20, 20), (512 << 20, 7)]
#: the store's targets: put+get against memcpy at 64 MB and up and at 1 MB, the
#: first get at every size, and put+get of 8 KB with the C fast path (crash-safe
#: puts, which copy into a free block and swap, included)
TARGETS = {"ratio_large": 1.3, "ratio_1mb": 2.0, "get_us": 30.0, "fixed_us": 8.0}


# -- methods: what the producer and the consumer do ---------------------------------


class Method:
    """One way of handing an array over. Subclasses override what they need."""

    name = ""
    e2e_only = False  # True: put + get is the end-to-end time
    repeat_get = False  # True: also time a second get of the same value

    def start(self, ctx: Any) -> Any:
        """Producer set-up; returns what the consumer's :meth:`open` receives."""
        return None

    def put(self, arr: np.ndarray, i: int) -> Any:
        """Hand ``arr`` over; returns the token the consumer's :meth:`get` receives."""
        raise NotImplementedError

    def after(self, token: Any) -> None:
        """Producer clean-up once the consumer is done with one hand-off (untimed)."""

    def stop(self) -> None:
        """Producer tear-down."""

    # consumer side
    def open(self, arg: Any) -> None:
        """Consumer set-up."""

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def drop(self, obj: Any) -> None:
        """Consumer clean-up of one hand-off (untimed)."""


class Polystore(Method):
    name = "polystore SharedArrayStore"
    repeat_get = True

    def start(self, ctx: Any) -> Any:
        self.store = SharedArrayStore()
        return self.store

    def put(self, arr: np.ndarray, i: int) -> Any:
        self.store.put("x", arr)

    def stop(self) -> None:
        self.store.close()

    def open(self, arg: Any) -> None:
        self.store = arg

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return self.store.get("x")


class PolystoreSpilled(Polystore):
    """The store with no room in shared memory: every value spills to a file on disk."""

    name = "polystore, spilled to disk (spill_dir)"
    repeat_get = False

    def start(self, ctx: Any) -> Any:
        self.spill = tempfile.mkdtemp(prefix="polystore-spill-")
        # 64 KiB of shared memory: the control segment's tables aside, every
        # value of the benchmark goes to the spill directory's file system.
        self.store = SharedArrayStore(max_bytes=64 << 10, cache_bytes=0, spill_dir=self.spill)
        return self.store

    def stop(self) -> None:
        self.store.close()
        os.rmdir(self.spill)


class Floor(Method):
    """The least any store that several processes write can do: one lock round trip
    around a copy into memory mapped once, and a bare view for the reader (no
    index, no pins, no checks). A reference point, not a usable store."""

    name = "floor: flock + copy / bare view"

    def start(self, ctx: Any) -> Any:
        import fcntl

        self.fcntl = fcntl
        fd, self.path = tempfile.mkstemp(prefix=f"polystore-{os.getpid()}-floor-", dir="/dev/shm")
        os.ftruncate(fd, max(SIZES))
        self.fd = fd
        self.mm = mmap.mmap(fd, max(SIZES))
        return self.path

    def put(self, arr: np.ndarray, i: int) -> Any:
        self.fcntl.flock(self.fd, self.fcntl.LOCK_EX)
        self.mm[: arr.nbytes] = memoryview(arr).cast("B")
        self.fcntl.flock(self.fd, self.fcntl.LOCK_UN)

    def stop(self) -> None:
        self.mm.close()
        os.close(self.fd)
        os.unlink(self.path)

    def open(self, arg: Any) -> None:
        with open(arg, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return np.frombuffer(self.mm, np.float32, shape[0], 0)


class ManagerDict(Method):
    name = "Manager().dict()"

    def start(self, ctx: Any) -> Any:
        self.manager = ctx.Manager()
        self.d = self.manager.dict()
        return self.d

    def put(self, arr: np.ndarray, i: int) -> Any:
        self.d["x"] = arr

    def stop(self) -> None:
        self.manager.shutdown()

    def open(self, arg: Any) -> None:
        self.d = arg

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return self.d["x"]


class ManagerBackend(Method):
    """The memory backend over a Manager dict, as built by default (``store="auto"``)."""

    name = "MemoryBackend(Manager().dict())"

    def start(self, ctx: Any) -> Any:
        self.manager = ctx.Manager()
        self.backend = MemoryBackend(shared_dict=self.manager.dict())
        return self.backend

    def put(self, arr: np.ndarray, i: int) -> Any:
        self.backend.save(arr, "x.npy")

    def stop(self) -> None:
        self.backend.close()
        self.manager.shutdown()

    def open(self, arg: Any) -> None:
        self.backend = arg

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return self.backend.load("x.npy")


class Queue(Method):
    name = "multiprocessing.Queue"
    e2e_only = True

    def start(self, ctx: Any) -> Any:
        self.q = ctx.Queue()
        return self.q

    def put(self, arr: np.ndarray, i: int) -> Any:
        self.q.put(arr)

    def stop(self) -> None:
        self.q.close()
        self.q.join_thread()

    def open(self, arg: Any) -> None:
        self.q = arg

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return self.q.get()


class FreshSharedMemory(Method):
    name = "fresh SharedMemory per array"

    def put(self, arr: np.ndarray, i: int) -> Any:
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(create=True, size=arr.nbytes)
        np.copyto(np.ndarray(arr.shape, arr.dtype, buffer=self.shm.buf), arr)
        return self.shm.name

    def after(self, token: Any) -> None:
        self.shm.close()
        self.shm.unlink()

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=token)
        return shm, np.ndarray(shape, np.float32, buffer=shm.buf)

    def drop(self, obj: Any) -> None:
        shm, view = obj
        del view
        shm.close()


class NpyMmap(Method):
    name = "np.save + np.load(mmap) in /dev/shm"

    def start(self, ctx: Any) -> Any:
        self.dir = tempfile.mkdtemp(prefix=f"polystore-{os.getpid()}-bench-", dir="/dev/shm")
        return self.dir

    def put(self, arr: np.ndarray, i: int) -> Any:
        path = os.path.join(self.dir, "x.npy")
        np.save(path, arr)
        return path

    def stop(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return np.load(token, mmap_mode="r")


class Ray(Method):
    name = "Ray object store"

    def start(self, ctx: Any) -> Any:
        import importlib

        self.ray = ray = importlib.import_module("ray")
        ray.init(include_dashboard=False, log_to_driver=False)
        return ray.get_runtime_context().gcs_address

    def put(self, arr: np.ndarray, i: int) -> Any:
        return self.ray.put(arr)

    def stop(self) -> None:
        self.ray.shutdown()

    def open(self, arg: Any) -> None:
        import importlib

        self.ray = ray = importlib.import_module("ray")
        ray.init(address=arg, log_to_driver=False)

    def get(self, token: Any, shape: tuple[int, ...]) -> Any:
        return self.ray.get(token)


METHODS: list[type[Method]] = [
    Polystore, PolystoreSpilled, Floor, ManagerDict, ManagerBackend, Queue, FreshSharedMemory,
    NpyMmap, Ray,
]  # fmt: skip


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# -- the two processes ------------------------------------------------------------------


def consumer(cls: type[Method], arg: Any, conn: Any, awake: bool = False) -> None:
    method = cls()
    method.open(arg)
    while True:
        if awake:  # spin instead of sleeping in recv: no wake-up cost
            while not conn.poll():
                pass
        msg = conn.recv()
        if msg is None:
            break
        token, shape = msg
        start = time.perf_counter()
        obj = method.get(token, shape)
        end = time.perf_counter()
        again = None
        if cls.repeat_get:  # the same get once more, with warm caches
            t0 = time.perf_counter()
            obj2 = method.get(token, shape)
            again = time.perf_counter() - t0
            method.drop(obj2)
            del obj2
        method.drop(obj)
        del obj
        conn.send((end - start, end, again))
    conn.close()


def repetitions(size: int, quick: bool) -> int:
    reps = next(r for limit, r in REPS if size <= limit)
    return max(3, reps // 10) if quick else reps


def run_method(
    cls: type[Method], ctx: Any, sizes: list[int], quick: bool, budget: float, awake: bool = False
) -> dict[int, dict[str, float]]:
    """Medians per size, in seconds: put, get, put+get, end to end, and memcpy.

    After every hand-off the producer also times one np.copyto of the same
    array into an already-faulted buffer, so that each method is compared with
    a memcpy made under the same conditions (cache state, load of the machine).
    """
    method = cls()
    arg = method.start(ctx)
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(cls, arg, theirs, awake))
    proc.start()
    results = {}
    try:
        for size in sizes:
            arr = np.ones(size // 4, dtype=np.float32)
            dst = np.zeros_like(arr)
            dst[...] = 2  # fault the destination in
            samples: dict[str, list[float]] = {k: [] for k in ("put", "get", "e2e", "cp", "get2")}
            warmup = 3
            deadline = time.perf_counter() + budget
            for i in range(warmup + repetitions(size, quick)):
                if i > warmup + 2 and time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                token = method.put(arr, i)
                put = time.perf_counter() - start
                ours.send((token, arr.shape))
                if awake:
                    while not ours.poll():
                        pass
                get, end, again = ours.recv()
                method.after(token)
                t0 = time.perf_counter()
                np.copyto(dst, arr)
                cp = time.perf_counter() - t0
                if i >= warmup:
                    for key, value in zip(samples, (put, get, end - start, cp, again), strict=True):
                        if value is not None:
                            samples[key].append(value)
            med = {k: statistics.median(v) for k, v in samples.items() if v}
            med["sum"] = med["e2e"] if cls.e2e_only else med["put"] + med["get"]
            med["n"] = len(samples["put"])
            results[size] = med
            del arr, dst
    finally:
        ours.send(None)
        proc.join()
        method.stop()
    return results


# -- peak memory ---------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def _peak_of(fn: Callable[[], Any]) -> tuple[int, Any]:
    _reset_peak()
    before = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - before, result


def rss_consumer(store: SharedArrayStore, conn: Any) -> None:
    conn.recv()
    peak, view = _peak_of(lambda: store.get("big"))
    del view
    conn.send(peak)
    conn.recv()


def rss_check(ctx: Any, size: int) -> dict[str, int] | None:
    """Peak RSS growth of a steady-state put (producer) and get (consumer)."""
    if not _reset_peak():
        return None
    arr = np.ones(size // 4, dtype=np.float32)
    with SharedArrayStore() as store:
        for _ in range(3):  # reach the steady state: blocks mapped in the producer
            store.put("big", arr)
        put_peak, _ = _peak_of(lambda: store.put("big", arr))
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=rss_consumer, args=(store, theirs))
        proc.start()
        ours.send("go")
        get_peak = ours.recv()
        ours.send("done")
        proc.join()
    return {"put": put_peak, "get": get_peak}


def idle_tax() -> tuple[float, float]:
    """Median time of one small fixed piece of Python work: awake, and after 13 ms asleep."""
    table = {f"k{i}": i for i in range(100)}
    buf = bytearray(1 << 16)

    def work() -> None:
        total = sum(table[f"k{i}"] for i in range(50))
        view = np.frombuffer(buf, np.float32, 100, 64).reshape(10, 10)
        del total, view

    out = []
    for pause in (0.0, 0.013):
        samples = []
        for _ in range(40):
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            work()
            samples.append(time.perf_counter() - start)
        out.append(statistics.median(samples))
    return out[0], out[1]


# -- report ----------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_size(size: int) -> str:
    return f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"


def report(sizes: list[int], results: dict[str, dict[int, dict[str, float]]]) -> None:
    ours = results[Polystore.name]
    width = 38
    print("\nput + get, median (ratio to np.copyto of the same array, timed between hand-offs)")
    print("method".ljust(width) + "".join(fmt_size(s).rjust(20) for s in sizes))
    row = [f"{fmt_time(ours[s]['cp'])} (1.0x)".rjust(20) for s in sizes]
    print("memcpy limit (np.copyto)".ljust(width) + "".join(row))
    for name, res in results.items():
        cells = [
            f"{fmt_time(res[s]['sum'])} ({res[s]['sum'] / res[s]['cp']:.1f}x)".rjust(20)
            for s in sizes
        ]
        print(name.ljust(width) + "".join(cells))
    print(f"\n{Polystore.name}: details and targets (get2: a second get, warm caches)")
    head = ["put", "get", "get2", "put+get", "end to end", "memcpy", "ratio"]
    print("size".ljust(8) + "".join(h.rjust(11) for h in head) + "  targets")
    for s in sizes:
        r = ours[s]
        ratio = r["sum"] / r["cp"]
        checks = [_check(f"get <= {TARGETS['get_us']:g} us", r["get"] * 1e6 <= TARGETS["get_us"])]
        if s <= 8 << 10:
            ok = r["sum"] * 1e6 <= TARGETS["fixed_us"]
            checks.append(_check(f"put+get <= {TARGETS['fixed_us']:g} us", ok))
        else:
            limit = TARGETS["ratio_1mb"] if s <= 1 << 20 else TARGETS["ratio_large"]
            checks.append(_check(f"ratio <= {limit:g}", ratio <= limit))
        cells = [fmt_time(r[k]).rjust(11) for k in ("put", "get", "get2", "sum", "e2e", "cp")]
        print(fmt_size(s).ljust(8) + "".join(cells) + f"{ratio:10.2f}x  " + "; ".join(checks))
    if Floor.name in results:
        floor = results[Floor.name]
        gets = ", ".join(f"{fmt_size(s)} {fmt_time(floor[s]['get'])}" for s in sizes)
        print(f"  the floor's get (one bare np.frombuffer, first call after the hand-off): {gets}")
    for name, res in results.items():
        if name not in (Polystore.name, Floor.name):
            faster = [fmt_size(s) for s in sizes if res[s]["sum"] <= ours[s]["sum"]]
            verdict = "FASTER at " + ", ".join(faster) if faster else "slower at every size"
            print(f"  {name}: {verdict} than polystore")


def _check(what: str, ok: bool) -> str:
    return f"{what}: {'ok' if ok else 'MISSED'}"


def plot(sizes: list[int], results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    mb = [s / 2**20 for s in sizes]
    reference = results[Polystore.name]
    ax.plot(mb, [reference[s]["cp"] for s in sizes], "k--", label="memcpy limit (np.copyto)")
    for name, res in results.items():
        style = "o-" if name == Polystore.name else (":" if name == Floor.name else ".-")
        lw = 2.5 if name == Polystore.name else 1.2
        ax.plot(mb, [res[s]["sum"] for s in sizes], style, lw=lw, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("array size (MB, float32)")
    ax.set_ylabel("put + get, median (s)")
    ax.set_title("Handing an array to another process")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"\nplot written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~1 minute)")
    parser.add_argument("--max-size", type=float, default=512, help="largest size in MB")
    parser.add_argument("--budget", type=float, default=None, help="seconds per method and size")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where to write the PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument(
        "--awake", action="store_true", help="both processes spin instead of sleeping in recv"
    )
    args = parser.parse_args(argv)
    sizes = [s for s in SIZES if s <= args.max_size * 2**20]
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 10.0)
    ctx = multiprocessing.get_context("spawn")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    results = {}
    for cls in METHODS:
        if cls is Ray and not ray_available():
            print(f"{cls.name}: skipped (ray is not installed)")
            continue
        t0 = time.perf_counter()
        results[cls.name] = run_method(cls, ctx, sizes, args.quick, budget, args.awake)
        print(f"{cls.name}: measured in {time.perf_counter() - t0:.0f} s")
    report(sizes, results)
    if sizes[-1] >= 64 << 20:
        rss = rss_check(ctx, sizes[-1])
        if rss is None:
            print("\npeak RSS: /proc/self/clear_refs is not writable here; skipped")
        else:
            print(
                f"\npeak RSS growth for one {fmt_size(sizes[-1])} hand-off (steady state): "
                f"put {rss['put'] / 2**20:.1f} MB in the producer, "
                f"get {rss['get'] / 2**20:.1f} MB in the consumer "
                f"(a hidden copy would add {fmt_size(sizes[-1])})"
            )
    awake, asleep = idle_tax()
    print(
        f"\ncold start on this machine: the same small piece of Python work takes "
        f"{fmt_time(awake)} when running and {fmt_time(asleep)} right after 13 ms asleep"
    )
    if not args.no_plot:
        plot(sizes, results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
