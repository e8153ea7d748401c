"""The lock-free read path of SharedArrayStore: seqlock validation and pins without the lock."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from polystore import SharedArrayStore, shmstore
from polystore._shm import fast as _shm_fast
from polystore._shm import keys
from polystore._shm import layout as ix
from polystore._shm import read as _shm_read

N = 2048  # 8 KB of float32: a small put, copied under the lock

# every test with and without the C fast path
pytestmark = pytest.mark.usefixtures("store_paths")


def hammer(store: SharedArrayStore, key: str, stop: Any, started: Any) -> None:
    """Overwrite ``key`` with constant arrays 0, 1, 2, ... until told to stop."""
    i = 0
    started.set()
    while not stop.is_set():
        store.put(key, np.full(N, float(i), dtype=np.float32))
        i += 1


def check_reads(store: SharedArrayStore, key: str, seconds: float) -> int:
    """Read ``key`` over and over; every view must be uniform and stay unchanged."""
    reads = 0
    held: list[tuple[np.ndarray, float]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        view = store.get(key)
        first = float(view[0])
        assert view.min() == view.max() == first, "a get saw a torn or reused block"
        held.append((view, first))
        if len(held) > 8:  # keep a few views alive while the writer runs
            old, value = held.pop(0)
            assert old.min() == old.max() == value, "a held view changed under its reader"
        reads += 1
    for old, value in held:
        assert old.min() == old.max() == value
    return reads


def race_a_writer(
    store: SharedArrayStore, spawn: Callable[..., Any], events: Callable[[], Any], seconds: float
) -> int:
    """Run :func:`hammer` on ``k`` in a writer made by ``spawn`` while this thread reads."""
    store.put("k", np.zeros(N, dtype=np.float32))
    stop, started = events(), events()
    writer = spawn(target=hammer, args=(store, "k", stop, started))
    writer.start()
    try:
        assert started.wait(20)
        return check_reads(store, "k", seconds)
    finally:
        stop.set()
        writer.join(20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lock_free", [True, False], ids=["lock-free", "locked"])
def test_reads_racing_a_writer_in_another_process(
    monkeypatch: pytest.MonkeyPatch, lock_free: bool
) -> None:
    monkeypatch.setattr(shmstore, "LOCK_FREE_GET", lock_free)
    ctx = multiprocessing.get_context("fork")
    with SharedArrayStore() as store:
        procs: list[Any] = []

        def spawn(**kwargs: Any) -> Any:
            procs.append(ctx.Process(**kwargs))
            return procs[-1]

        assert race_a_writer(store, spawn, ctx.Event, 1.5) > 100
        assert procs[0].exitcode == 0


@pytest.mark.timeout(60)
def test_reads_racing_a_writer_thread() -> None:
    with SharedArrayStore() as store:
        race_a_writer(store, threading.Thread, threading.Event, 1.0)


def test_a_writer_between_lookup_and_check_sends_the_reader_to_the_lock(
    monkeypatch: pytest.MonkeyPatch, store_paths: str
) -> None:
    with SharedArrayStore() as store:
        store.put("k", np.arange(N, dtype=np.float32))
        store.get("k")  # the process has its pin row and the value's description now
        a = store._arena
        real_find = a.find
        calls = []

        def write_once() -> None:  # as if another process wrote right after our lookup
            if not calls:
                a.q[ix.H_WSEQ] += 2
            calls.append(1)

        def find_then_write(kbz: bytes, h: int) -> tuple[int, int]:
            found = real_find(kbz, h)
            write_once()
            return found

        monkeypatch.setattr(a, "find", find_then_write)
        if store_paths == "c":  # the C read takes the hook between its pin and its check
            _shm_fast._fastpath._set_test_hook(write_once)
        try:
            view = store.get("k")
        finally:
            if store_paths == "c":
                _shm_fast._fastpath._set_test_hook(None)
        assert np.array_equal(view, np.arange(N, dtype=np.float32))
        # C: its try, then Python's lock-free try (no write this time);
        # Python: the lock-free try, then the locked read
        assert len(calls) == 2
        monkeypatch.undo()
        del view
        # the failed try left no pin behind: only the successful read's, gone with the view
        assert not a.pins_np[: a.h[ix.H_PROC_HW]].any()


def test_a_writer_inside_the_lock_sends_readers_to_the_lock() -> None:
    with SharedArrayStore() as store:
        store.put("k", np.arange(4.0))
        store.get("k")
        a = store._arena
        seen = []
        a.acquire()  # the counter is odd while the lock is held
        try:
            assert a.h[ix.H_WSEQ] & 1
            _, kbz, h = keys.key_parts("k")
            seen.append(_shm_read.get_optimistic(a, kbz, h))
        finally:
            a.release()
        assert seen == [_shm_read.RETRY]
        assert not a.h[ix.H_WSEQ] & 1
        assert _shm_read.get_optimistic(a, kbz, h) not in (None, _shm_read.RETRY)


def test_a_counter_left_odd_by_a_dead_writer_is_repaired() -> None:
    with SharedArrayStore() as store:
        store.put("k", np.arange(4.0))
        a = store._arena
        a.q[ix.H_WSEQ] += 1  # odd, as a writer killed inside the lock leaves it
        before = a.h[ix.H_WSEQ]
        assert np.array_equal(store.get("k"), np.arange(4.0))  # through the lock
        assert a.h[ix.H_WSEQ] > before and not a.h[ix.H_WSEQ] & 1


def test_missing_key_is_a_key_error_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    with SharedArrayStore() as store:
        store.put("k", np.arange(4.0))
        store.get("k")
        for lock_free in (True, False):
            monkeypatch.setattr(shmstore, "LOCK_FREE_GET", lock_free)
            with pytest.raises(KeyError):
                store.get("absent")


def test_retired_block_is_reused_once_its_last_view_dies() -> None:
    with SharedArrayStore() as store:
        store.put("k", np.zeros(1 << 20, dtype=np.uint8))  # a large class: its own segment
        view = store.get("k")
        store.put("k", np.ones(1 << 20, dtype=np.uint8))  # the old block is retired
        mapped = store.stats()["mapped_bytes"]
        del view  # unpinned without the lock; the next put that needs a block sweeps
        for i in range(5):
            store.put("k", np.full(1 << 20, i, dtype=np.uint8))
            assert store.get("k")[0] == i
        assert store.stats()["mapped_bytes"] == mapped


def test_reserve_makes_memory_ready_for_later_puts() -> None:
    with SharedArrayStore() as store:
        ready = store.reserve(5 << 20, 1 << 20)
        assert ready >= 5 << 20
        stats = store.stats()
        assert stats["mapped_bytes"] == stats["idle_bytes"] >= ready
        for i in range(5):  # these puts take the reserved blocks: nothing new is mapped
            store.put(f"k{i}", np.full(1 << 20, i, dtype=np.uint8))
        assert store.stats()["mapped_bytes"] == stats["mapped_bytes"]
        assert [int(store.get(f"k{i}")[0]) for i in range(5)] == list(range(5))


def test_reserve_refuses_what_it_could_not_keep() -> None:
    with SharedArrayStore(cache_bytes=4 << 20, max_bytes=8 << 20) as store:
        with pytest.raises(ValueError, match="cache_bytes"):
            store.reserve(5 << 20, 1 << 20)
        with pytest.raises(ValueError, match="positive"):
            store.reserve(0, 1 << 20)
        with pytest.raises(ValueError, match="positive"):
            store.reserve(1 << 20, -1)
    with SharedArrayStore(max_bytes=3 << 20) as store:
        from polystore import ShmFullError

        with pytest.raises(ShmFullError):
            store.reserve(3 << 20, 2 << 20)  # two 2 MiB blocks do not fit in 3 MiB
        assert store.stats()["mapped_bytes"] <= 3 << 20
        store.put("k", np.zeros(2 << 20, dtype=np.uint8))  # what was taken went back


def _map_then_use(store: SharedArrayStore, keys: list[str]) -> tuple[int, int, int]:
    """In a fresh process: map_all(), then read ``keys`` and write two values; count opens."""
    mapped = store.map_all()
    opened = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    os.open = counting_open  # type: ignore[assignment]
    try:
        total = sum(int(store.get(key)[0]) for key in keys)
        for i in range(2):
            store.put(f"new{i}", np.full(1 << 20, 7, dtype=np.uint8))
    finally:
        os.open = real_open
    return mapped, len(opened), total


def test_map_all_maps_every_segment_before_use() -> None:
    context = multiprocessing.get_context("spawn")
    with SharedArrayStore() as store:
        for i in range(3):
            store.put(f"k{i}", np.full(1 << 20, i, dtype=np.uint8))
        store.reserve(2 << 20, 1 << 20)  # idle blocks for the child's puts
        stats = store.stats()
        with context.Pool(1) as pool:
            mapped, opened, total = pool.apply(_map_then_use, (store, ["k0", "k1", "k2"]))
        assert mapped == stats["mapped_bytes"]
        assert opened == 0, "a get or put after map_all() opened a segment"
        assert total == 0 + 1 + 2
        assert int(store.get("new1")[0]) == 7
    with pytest.raises(shmstore.StoreClosedError):
        store.map_all()


def _check_inherited(view: Any, go: Any, conn: Any) -> None:
    """In a forked child: wait until the parent dropped its view and overwrote, then check."""
    go.wait(30)
    conn.send(bool((view == 1).all()))


@pytest.mark.parametrize("nbytes", [8 << 10, 4 << 20])
def test_views_inherited_through_fork_survive_the_parent_dropping_them(nbytes: int) -> None:
    context = multiprocessing.get_context("fork")
    with SharedArrayStore() as store:
        store.put("k", np.ones(nbytes, dtype=np.uint8))
        view = store.get("k")
        go = context.Event()
        ours, theirs = context.Pipe()
        child = context.Process(target=_check_inherited, args=(view, go, theirs))
        child.start()
        del view  # the parent's pin goes; the child's own pin must keep the block
        for i in range(20):  # without it, these overwrite the very block the child reads
            store.put("k", np.full(nbytes, 2 + i % 5, dtype=np.uint8))
            store.delete("k")
            store.put("k", np.full(nbytes, 2, dtype=np.uint8))
        go.set()
        assert ours.poll(30) and ours.recv() is True, "a view inherited through fork changed"
        child.join(30)
        assert child.exitcode == 0
        # The child's row goes with it: its block is reused once a put needs memory.
        used = store.stats()["mapped_bytes"]
        for i in range(20):
            store.put(f"x{i % 3}", np.zeros(nbytes, dtype=np.uint8))
        assert store.stats()["mapped_bytes"] <= used + 3 * max(nbytes, 1 << 20)


def test_only_a_fork_with_live_views_holds_the_store() -> None:
    from polystore._shm import fork as _shm_fork

    with SharedArrayStore() as store:
        store.put("k", np.ones(16, dtype=np.uint8))
        arena = store._arena
        _shm_fork._before_fork()  # no view: nothing is held, nothing waits
        assert _shm_fork._handoff is None or arena not in _shm_fork._handoff[0]
        _shm_fork._after_fork_in_parent()
        view = store.get("k")
        _shm_fork._before_fork()
        try:
            assert _shm_fork._handoff is not None and arena in _shm_fork._handoff[0]
            assert arena.h[ix.H_WSEQ] & 1, "the store is locked across the fork"
        finally:
            _shm_fork._after_fork_in_parent()  # no child: the pipe ends at once
        assert not arena.h[ix.H_WSEQ] & 1 and _shm_fork._handoff is None
        del view


@pytest.mark.timeout(60)
def test_threads_pinning_and_unpinning_one_block_lose_no_count() -> None:
    # Views of one block taken and dropped by several threads at once: the
    # C path pins without the thread lock, so every change to the row must
    # be atomic, or a count is lost (a block freed under a view) or left over.
    with SharedArrayStore() as store:
        store.put("k", np.arange(N, dtype=np.float32))
        a = store._arena
        store.get("k")
        held = store.get("k")  # one view stays: its pin must survive the storm
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                for _ in range(3000):
                    view = store.get("k")
                    more = view[1:]
                    del view, more
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        row = a.pins_np[a.slot]
        assert row.sum() == 1 and row.min() >= 0
        del held
        assert not a.pins_np.any()


DESCRIPTIONS = [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    np.zeros((2, 1, 3, 1), dtype=">u4"),
    np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    np.arange(5, dtype=np.complex64),
]


@pytest.mark.parametrize("value", DESCRIPTIONS, ids=lambda v: f"{v.dtype}-{v.ndim}d")
def test_a_new_key_is_described_as_python_describes_it(
    value: np.ndarray, monkeypatch: pytest.MonkeyPatch, store_paths: str
) -> None:
    """The first get of a key: C decodes its description where Python did so once."""
    with SharedArrayStore() as store:
        store.put("first", value)
        assert np.array_equal(store.get("first"), value)  # decoded once, in Python
        store.put("new", value)
        a = store._arena
        decoded = []
        real = _shm_read.read_meta
        monkeypatch.setattr(_shm_read, "read_meta", lambda *args: decoded.append(1) or real(*args))
        got = store.get("new")
        assert np.array_equal(got, value)
        assert got.flags.f_contiguous == value.flags.f_contiguous and got.dtype == value.dtype
        e = a.find(*keys.key_parts("new")[1:])[1]
        assert a.meta[e] == real(a, e)  # what C cached is what Python would have
        if store_paths == "c":
            assert not decoded, "the C read path left a known dtype to Python"


def test_a_description_read_across_a_write_is_not_cached(
    monkeypatch: pytest.MonkeyPatch, store_paths: str
) -> None:
    """C decodes a new key's description before its seqlock check: if a writer
    got in, the description may be torn and must not be kept."""
    if store_paths != "c":
        pytest.skip("the C read path only")
    with SharedArrayStore() as store:
        store.put("k", np.arange(N, dtype=np.float32))
        store.get("k")  # a pin row, and float32 decoded once
        store.put("n", np.arange(N, dtype=np.float32))
        a = store._arena
        e = a.find(*keys.key_parts("n")[1:])[1]
        a.meta.pop(e)  # as in a process that did not write it
        calls: list[bool] = []

        def hook() -> None:  # between the pin and the check of every C try
            if not calls:
                a.q[ix.H_WSEQ] += 2  # as if a writer got in: this try must fail
            calls.append(e in a.meta)  # what the tries before this one cached

        _shm_fast._fastpath._set_test_hook(hook)
        try:
            view = store.get("n")
        finally:
            _shm_fast._fastpath._set_test_hook(None)
        assert calls == [False, False]  # the failed try kept nothing; the next succeeded
        assert e in a.meta
        assert np.array_equal(view, np.arange(N, dtype=np.float32))
