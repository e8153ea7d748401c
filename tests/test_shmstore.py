"""SharedArrayStore: values, views, limits, lifetime, and other processes.

The autouse ``no_leaks`` fixture of conftest.py checks after every test that
no child process and no polystore segment in /dev/shm was left behind.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from polystore._shm import alloc as _shm_alloc
from polystore._shm import layout as ix
from polystore.exceptions import (
    NotShareableError,
    ShmFullError,
    StorageError,
    StoreClosedError,
    StoreNotFoundError,
)
from polystore.shmstore import SharedArrayStore

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm"),
    pytest.mark.usefixtures("store_paths"),  # every test with and without the C fast path
]


def files_of(store: SharedArrayStore) -> list[str]:
    prefix = f"{ix.PREFIX}{store._owner_pid}-{store.name}."
    return sorted(n for n in os.listdir(ix.SHM_DIR) if n.startswith(prefix))


@pytest.fixture
def store() -> Iterator[SharedArrayStore]:
    with SharedArrayStore() as s:
        yield s


# -- values ------------------------------------------------------------------------------

DTYPES = [
    "bool", "i1", "u2", "<i4", ">i8", "f2", "<f4", ">f8", "c16", "U7", "S5", "V3",
    "M8[ns]", "m8[s]", [("x", "<i4"), ("y", "<f8", (2,))], [("a", "u1"), ("b", ">i2")],
]  # fmt: skip


def sample(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    raw = np.random.default_rng(0).integers(0, 255, (int(np.prod(shape)) or 1) * 64, np.uint8)
    dt = np.dtype(dtype)
    return raw[: int(np.prod(shape)) * dt.itemsize].view(dt).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_dtypes(store: SharedArrayStore, dtype: Any) -> None:
    value = sample(dtype, (3, 5))
    store.put("k", value)
    got = store.get("k")
    assert got.dtype == value.dtype
    assert got.shape == value.shape
    assert got.tobytes() == value.tobytes()


@pytest.mark.parametrize(
    "shape", [(), (0,), (0, 3), (1,), (7,), (3, 4), (2, 3, 4), (1,) * 32, (2, 0, 5)], ids=str
)
def test_round_trip_shapes(store: SharedArrayStore, shape: tuple[int, ...]) -> None:
    value = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    store.put("k", value)
    got = store.get("k")
    assert got.shape == shape
    np.testing.assert_array_equal(got, value)
    assert not got.flags.writeable
    info = store.info("k")
    assert (info.shape, info.dtype, info.nbytes, info.kind) == (
        shape,
        value.dtype,
        value.nbytes,
        "array",
    )


def test_fortran_order_kept_and_other_layouts_copied(store: SharedArrayStore) -> None:
    f = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    store.put("f", f)
    assert store.get("f").flags.f_contiguous and store.info("f").order == "F"
    np.testing.assert_array_equal(store.get("f"), f)
    for name, value in {
        "strided": np.arange(40)[::3],
        "transposed_3d": np.arange(24).reshape(2, 3, 4).transpose(1, 0, 2),
        "negative": np.arange(10)[::-1],
    }.items():
        store.put(name, value)
        got = store.get(name)
        assert got.flags.c_contiguous and store.info(name).order == "C"
        np.testing.assert_array_equal(got, value)


def test_array_likes_scalars_and_bytes(store: SharedArrayStore) -> None:
    store.put("list", [[1, 2], [3, 4]])
    np.testing.assert_array_equal(store.get("list"), [[1, 2], [3, 4]])
    store.put("scalar", np.float32(2.5))
    assert store.get("scalar").shape == () and store.get("scalar")[()] == 2.5
    store.put_bytes("blob", b"\x00abc\xff")
    assert store.get_bytes("blob") == b"\x00abc\xff"
    assert store.info("blob").kind == "bytes"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    with pytest.raises(TypeError, match="holds an array"):
        store.get_bytes("list")


def test_big_array_round_trip(store: SharedArrayStore) -> None:
    value = np.arange(12 << 20, dtype=np.int32)  # 48 MB: a segment of its own
    store.put("big", value)
    got = store.get("big")
    assert got[0] == 0 and got[-1] == value[-1] and np.array_equal(got[::4096], value[::4096])


def test_object_arrays_refused(store: SharedArrayStore) -> None:
    with pytest.raises(NotShareableError, match="Python objects"):
        store.put("o", np.array([1, "a"], dtype=object))
    with pytest.raises(TypeError):
        store.put("o", np.zeros(2, dtype=[("a", "O")]))
    assert "o" not in store


# -- update: several keys in one step -----------------------------------------------------


def test_update_puts_and_removes_together(store: SharedArrayStore) -> None:
    from polystore._shm.check import problems

    store.put("old", np.zeros(3))
    store.update({"a": np.arange(4), "b": b"bytes", "c": np.ones((2, 3), order="F")},
                 remove=["old", "absent"])  # fmt: skip
    assert np.array_equal(store.get("a"), np.arange(4)) and store.get_bytes("b") == b"bytes"
    assert store.get("c").flags.f_contiguous and "old" not in store
    store.update(remove=iter(["a", "b"]))  # any iterable of keys
    assert "a" not in store and "b" not in store and "c" in store
    store.update({})  # nothing to do
    assert not problems(store._arena)


def test_a_refused_update_changes_nothing(store: SharedArrayStore) -> None:
    from polystore._shm.check import problems

    store.put("a", np.zeros(3))
    stats = store.stats()
    with pytest.raises(ValueError, match="both put and removed"):
        store.update({"a": np.ones(3)}, remove=["a"])
    with pytest.raises(TypeError, match="not one key"):
        store.update({"b": np.ones(3)}, remove="a")
    with pytest.raises(NotShareableError):  # the second value is refused: the first is not put
        store.update({"b": np.ones(3), "c": np.array([1, "x"], dtype=object)}, remove=["a"])
    with pytest.raises(ValueError):
        store.update({"b": np.ones(3), "": np.ones(3)})
    with pytest.raises(ValueError, match="at most 1024 keys"):  # its journal must fit
        store.update({"b": np.ones(3)}, remove=[f"x{i}" for i in range(1024)])
    assert "b" not in store and np.array_equal(store.get("a"), np.zeros(3))
    assert store.stats()["keys"] == stats["keys"] == 1
    assert not problems(store._arena)


def test_an_update_with_no_room_changes_nothing() -> None:
    from polystore._shm.check import problems

    with SharedArrayStore(max_bytes=8 << 20) as store:
        store.put("a", np.zeros(3))
        with pytest.raises(ShmFullError):  # the first value fits, the second does not
            store.update({"b": np.ones(1 << 19), "c": np.ones(1 << 20)}, remove=["a"])
        assert "b" not in store and "c" not in store and "a" in store
        assert not problems(store._arena)
        store.update({"b": np.ones(1 << 19)}, remove=["a"])  # the room was given back
        assert "a" not in store


def test_rename_moves_a_value_without_copying_it(store: SharedArrayStore) -> None:
    from polystore._shm.check import problems

    store.put("a", np.arange(1000.0))
    held = store.get("a")
    store.rename("a", "b")
    assert "a" not in store and np.shares_memory(held, store.get("b"))
    store.put("c", np.zeros((3, 3), np.int8))  # another description: replaced
    store.rename("b", "c")
    assert np.array_equal(store.get("c"), np.arange(1000.0)) and len(store) == 1
    store.rename("c", "c")  # onto itself: nothing changes
    with pytest.raises(KeyError):
        store.rename("missing", "c")
    with pytest.raises(KeyError):
        store.rename("missing", "missing")
    store.put("d", np.ones(2))
    with pytest.raises(FileExistsError):
        store.rename("c", "d", overwrite=False)
    with pytest.raises(FileExistsError):
        store.rename("c", "c", overwrite=False)
    assert np.array_equal(store.get("d"), np.ones(2)) and "c" in store
    assert (held == np.arange(1000.0)).all()  # the view never changed
    del held
    assert not problems(store._arena)


def test_a_closed_store_refuses_update_and_rename() -> None:
    store = SharedArrayStore()
    store.put("a", np.zeros(2))
    store.close()
    for call in (
        lambda: store.rename("a", "b"),
        lambda: store.rename("a", "a"),
        lambda: store.update({"b": np.ones(2)}),
        lambda: store.update(remove=["a"]),
    ):
        with pytest.raises(StoreClosedError):
            call()


# -- views ---------------------------------------------------------------------------------


def test_views_are_read_only_and_shared(store: SharedArrayStore) -> None:
    store.put("k", np.arange(100.0))
    a, b = store.get("k"), store.get("k")
    assert np.shares_memory(a, b)
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(ValueError):
        a.flags.writeable = True


def test_overwrite_and_delete_keep_held_views(store: SharedArrayStore) -> None:
    store.put("k", np.full(1000, 1.0))
    held = store.get("k")[10:20]  # a derived view must keep the block pinned too
    store.put("k", np.full(1000, 2.0))
    assert (held == 1.0).all() and (store.get("k") == 2.0).all()
    store.delete("k")
    for i in range(20):  # churn: freed blocks are recycled, the held one is not
        store.put(f"other{i}", np.full(1000, 3.0 + i))
    assert (held == 1.0).all()
    assert "k" not in store


def test_steady_state_recycles_memory(store: SharedArrayStore) -> None:
    for size in (1000, 300_000, 3_000_000):
        for i in range(5):
            store.put("k", np.full(size, float(i)))
            view = store.get("k")
            assert view[0] == i
            del view
        before = store.stats()["mapped_bytes"]
        for i in range(20):
            store.put("k", np.full(size, float(i)))
            assert store.get("k")[-1] == i
        assert store.stats()["mapped_bytes"] == before


def pins_of(store: SharedArrayStore, key: str) -> int:
    """Views of ``key``'s block that the store counts, across all processes."""
    a = store._arena
    a.acquire()
    try:
        e = a.find(key.encode() + b"\0", zlib.crc32(key.encode()) & 0x7FFFFFFF)[1]
        b = a.eq[e * (ix.ENT_SIZE // 8) + ix.E_BLOCK]
        return int(a.pins_np[: a.h[ix.H_PROC_HW], b].sum())
    finally:
        a.release()


def test_views_pin_their_block_until_they_die(store: SharedArrayStore) -> None:
    store.put("k", np.arange(1000.0))
    views = [store.get("k") for _ in range(3)]
    derived = views[0][::2]
    assert pins_of(store, "k") == 3
    del views[1:]
    assert pins_of(store, "k") == 1
    del views[0]
    assert pins_of(store, "k") == 1  # `derived` keeps the first view's buffer alive
    del derived
    assert pins_of(store, "k") == 0


def test_view_dying_inside_a_critical_section_is_unpinned_at_release(
    store: SharedArrayStore,
) -> None:
    store.put("k", np.arange(1000.0))
    view = store.get("k")
    a = store._arena
    a.acquire()  # as if the garbage collector ran while the store lock is held
    try:
        del view  # the callback must not take the lock again
        if a.fast is None:
            assert a._pending  # it defers the unpin to the release
        else:
            assert not a._pending and a.pins_np[a.slot].sum() == 0  # one atomic unpin, no lock
    finally:
        a.release()
    assert not a._pending and pins_of(store, "k") == 0


def test_view_of_one_store_dying_while_another_is_locked() -> None:
    with SharedArrayStore() as first, SharedArrayStore() as second:
        first.put("k", np.arange(10.0))
        second.put("k", np.arange(10.0))
        view = second.get("k")
        a = first._arena
        a.acquire()
        try:
            del view  # second's lock is free: taken without waiting
            assert pins_of(second, "k") == 0
        finally:
            a.release()


def test_views_survive_close(store: SharedArrayStore) -> None:
    store.put("k", np.arange(1 << 16, dtype=np.int64))
    view = store.get("k")
    store.close()
    assert files_of(store) == []
    assert view[-1] == (1 << 16) - 1  # still mapped: no crash, no BufferError
    del view


def test_many_keys_deletes_and_rehash() -> None:
    with SharedArrayStore(max_keys=64) as s:
        for round_ in range(10):  # tombstones pile up and force rehashes
            for i in range(40):
                s.put(f"r{round_}/k{i}", np.array([round_, i]))
            for i in range(0, 40, 2):
                s.delete(f"r{round_}/k{i}")
            for i in range(1, 40, 2):
                s.delete(f"r{round_}/k{i}")
        for i in range(60):
            s.put(f"final{i}", np.array([i]))
        assert s.keys() == sorted(f"final{i}" for i in range(60))
        assert all(s.get(f"final{i}")[0] == i for i in range(60))
        with pytest.raises(StorageError, match="max_keys"):
            for i in range(60, 70):
                s.put(f"final{i}", np.array([i]))
        a = s._arena
        states = a.blk_np[: a.h[ix.H_BLK_HW], ix.B_STATE]
        assert not (states == ix.WRITING).any()  # the refused put gave its block back


# -- keys and errors ---------------------------------------------------------------------


def test_keys_validated(store: SharedArrayStore) -> None:
    value = np.zeros(1)
    cases: list[tuple[object, type[Exception]]] = [
        (1, TypeError), (b"k", TypeError), (None, TypeError), ("", ValueError),
        ("a\0b", ValueError), ("x" * 256, ValueError), ("é" * 128, ValueError),
    ]  # fmt: skip
    for bad, exc in cases:
        with pytest.raises(exc):
            store.put(bad, value)  # type: ignore[arg-type]
    for good in ["x" * 255, "é" * 127, "a/b c.npy", "☃"]:
        store.put(good, value)
        assert good in store
    assert 1 not in store
    assert len(store) == 4


def test_missing_keys_and_overwrite_false(store: SharedArrayStore) -> None:
    for op in (store.get, store.delete, store.info, store.get_bytes):
        with pytest.raises(KeyError):
            op("missing")
    store.put("k", np.ones(3))
    with pytest.raises(FileExistsError):
        store.put("k", np.zeros(3), overwrite=False)
    with pytest.raises(FileExistsError):
        store.put("k", np.zeros(1 << 20), overwrite=False)  # the large-put path too
    assert (store.get("k") == 1).all()


def test_max_bytes_raises_before_writing() -> None:
    with SharedArrayStore(max_bytes=8 << 20) as s:
        s.put("small", np.ones(10))
        before = s.stats()
        with pytest.raises(ShmFullError) as info:
            s.put("big", np.ones(2 << 20))  # 16 MB
        assert isinstance(info.value, MemoryError) and info.value.needed >= 16 << 20
        assert "big" not in s and s.stats()["mapped_bytes"] == before["mapped_bytes"]
        s.put("fits", np.ones(1 << 19))  # 4 MB still fits
        s.delete("fits")
        s.put("fits2", np.ones(600_000))  # the idle segment is evicted to make room


def test_full_dev_shm_raises_before_writing(
    store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_shm_alloc, "shm_free_bytes", lambda directory: 1 << 20)
    with pytest.raises(ShmFullError, match="/dev/shm"):
        store.put("k", np.ones(1 << 20))
    assert "k" not in store and store.stats()["segments"] == 0


def test_closed_store_refuses_work() -> None:
    s = SharedArrayStore()
    s.put("k", np.ones(2))
    s.close()
    s.close()  # idempotent
    assert s.closed and not s.is_owner
    for op in (lambda: s.get("k"), lambda: s.put("k", np.ones(1)), s.keys, lambda: len(s)):
        with pytest.raises(StoreClosedError):
            op()
    with pytest.raises(StorageError):
        SharedArrayStore.attach(s.name)


def test_names() -> None:
    for bad in ["", "-x", "a.b", "a/b", "x" * 65]:
        with pytest.raises(ValueError):
            SharedArrayStore(bad)
    with SharedArrayStore("named_store-1") as s:
        assert s.name == "named_store-1"
        with pytest.raises(StorageError, match="in use"):
            SharedArrayStore("named_store-1")
        other = SharedArrayStore.attach("named_store-1")
        assert not other.is_owner and s.is_owner
        other.close()
    with pytest.raises(StoreNotFoundError, match="no shared array store") as info:
        SharedArrayStore.attach("named_store-1")
    assert isinstance(info.value, FileNotFoundError)


def test_pickles_small_to_an_attached_store(store: SharedArrayStore) -> None:
    store.put("k", np.arange(5))
    data = pickle.dumps(store)
    assert len(data) < 200
    again = pickle.loads(data)
    assert not again.is_owner and again.name == store.name
    np.testing.assert_array_equal(again.get("k"), np.arange(5))
    again.close()
    assert store.get("k")[4] == 4  # closing an attached handle leaves the store alone


def test_owner_garbage_collected_removes_store() -> None:
    s = SharedArrayStore()
    s.put("k", np.ones(100))
    prefix = f"{ix.PREFIX}{os.getpid()}-{s.name}."
    del s
    gc.collect()
    assert not [n for n in os.listdir(ix.SHM_DIR) if n.startswith(prefix)]


def test_files_are_private(store: SharedArrayStore) -> None:
    store.put("k", np.ones(10))
    for name in files_of(store):
        assert os.stat(os.path.join(ix.SHM_DIR, name)).st_mode & 0o777 == 0o600


def test_threads(store: SharedArrayStore) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                store.put(f"t{t}", np.full(100 + i, t))
                view = store.get(f"t{(t + 1) % 4}") if f"t{(t + 1) % 4}" in store else None
                assert view is None or (view == (t + 1) % 4).all()
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- other processes ----------------------------------------------------------------------


def child_put(store: SharedArrayStore, n: int) -> None:
    for i in range(n):
        store.put(f"c{i}", np.full((i + 1) * 1000, i, dtype=np.int32))


def child_check(store: SharedArrayStore, conn: Any) -> None:
    total = sum(int(store.get(f"p{i}").sum()) for i in range(4))
    conn.send((total, store.get("big")[-1]))


@pytest.mark.timeout(60)
def test_put_in_child_get_in_parent(mp_context: Any, store: SharedArrayStore) -> None:
    p = mp_context.Process(target=child_put, args=(store, 5))
    p.start()
    p.join()
    assert p.exitcode == 0
    for i in range(5):
        assert store.get(f"c{i}").shape == ((i + 1) * 1000,) and store.get(f"c{i}")[0] == i
    store.put("after", np.ones(3))  # the child's exit did not close the store
    assert store.is_owner and len(store) == 6


@pytest.mark.timeout(60)
def test_put_in_parent_get_in_child(mp_context: Any, store: SharedArrayStore) -> None:
    for i in range(4):
        store.put(f"p{i}", np.full(1000, i))
    store.put("big", np.arange(3 << 20, dtype=np.int64))
    ours, theirs = mp_context.Pipe()
    p = mp_context.Process(target=child_check, args=(store, theirs))
    p.start()
    assert ours.recv() == (6000, (3 << 20) - 1)
    p.join()
    assert p.exitcode == 0


_worker: dict[str, SharedArrayStore] = {}  # what a pool initializer hands its tasks


def init_worker(store: SharedArrayStore) -> None:
    _worker["store"] = store


def pool_task(i: int) -> int:
    _worker["store"].put(f"w{i}", np.full(10, i))
    return int(_worker["store"].get(f"w{i}").sum())


def pool_task_with_store(args: tuple[SharedArrayStore, int]) -> float:
    store, i = args
    return float(store.get("shared").sum()) + i


@pytest.mark.timeout(60)
def test_pool_initializer_and_task_arguments(mp_context: Any, store: SharedArrayStore) -> None:
    store.put("shared", np.ones(1000))
    with mp_context.Pool(2, initializer=init_worker, initargs=(store,)) as pool:
        assert pool.map(pool_task, range(8)) == [10 * i for i in range(8)]
        assert pool.map(pool_task_with_store, [(store, i) for i in range(8)]) == [
            1000.0 + i for i in range(8)
        ]
    assert sorted(store.keys()) == sorted(["shared"] + [f"w{i}" for i in range(8)])


def child_hold_view(store: SharedArrayStore, conn: Any) -> None:
    view = store.get("k")
    first = view.copy()
    conn.send("holding")
    conn.recv()  # the parent overwrote and deleted the key meanwhile
    conn.send(bool(np.array_equal(view, first)))


@pytest.mark.timeout(60)
def test_overwrite_while_child_holds_view(mp_context: Any, store: SharedArrayStore) -> None:
    store.put("k", np.arange(300_000.0))
    ours, theirs = mp_context.Pipe()
    p = mp_context.Process(target=child_hold_view, args=(store, theirs))
    p.start()
    assert ours.recv() == "holding"
    for i in range(5):
        store.put("k", np.full(300_000, float(-i)))
    store.delete("k")
    for i in range(5):
        store.put(f"x{i}", np.full(300_000, 7.0))
    ours.send("check")
    assert ours.recv() is True
    p.join()


def child_forever_put(store: SharedArrayStore, conn: Any) -> None:
    i = 0
    while True:
        store.put("k", np.full(4 << 20, float(i)))  # 32 MB: copied outside the lock
        if i == 0:
            conn.send("started")
        i += 1


def child_hold_and_wait(store: SharedArrayStore, conn: Any) -> None:
    view = store.get("k")
    conn.send(float(view[0]))
    time.sleep(60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sigkilled_writer_and_reader(method: str, store: SharedArrayStore) -> None:
    ctx: Any = multiprocessing.get_context(method)
    ours, theirs = ctx.Pipe()
    writer = ctx.Process(target=child_forever_put, args=(store, theirs))
    writer.start()
    assert ours.recv() == "started"
    time.sleep(0.15)
    os.kill(writer.pid, signal.SIGKILL)  # most likely in the middle of a copy
    writer.join()
    value = store.get("k")
    assert value.shape == (4 << 20,) and (value == value[0]).all()  # old or new, whole
    del value
    reader = ctx.Process(target=child_hold_and_wait, args=(store, theirs))
    reader.start()
    ours.recv()
    os.kill(reader.pid, signal.SIGKILL)  # dies holding a view
    reader.join()
    store.put("k", np.full(4 << 20, -1.0))
    mapped = store.stats()["mapped_bytes"]
    for i in range(6):  # the dead processes' blocks and pins come back
        store.put("k", np.full(4 << 20, float(i)))
    assert store.stats()["mapped_bytes"] <= mapped
    assert store.stats()["processes"] == 1
    assert store.get("k")[0] == 5.0


def stress_writer(store: SharedArrayStore, wid: int, seconds: float) -> None:
    rng = np.random.default_rng(wid)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        key = f"k{rng.integers(4)}"
        n = int(rng.choice([10, 5000, 300_000]))  # small, slab and large paths
        if rng.random() < 0.1:
            try:
                store.delete(key)
            except KeyError:
                pass
        else:
            store.put(key, np.full(n, wid * 1_000_000 + i, dtype=np.int64))
        i += 1


def stress_reader(store: SharedArrayStore, seconds: float, conn: Any) -> None:
    rng = np.random.default_rng()
    end = time.monotonic() + seconds
    held: list[tuple[np.ndarray, int]] = []
    reads = torn = changed = 0
    while time.monotonic() < end:
        try:
            view = store.get(f"k{rng.integers(4)}")
        except KeyError:
            continue
        reads += 1
        first = int(view[0])
        torn += int(not (view == first).all())
        held.append((view, first))
        if len(held) > 5:
            old, value = held.pop(int(rng.integers(len(held))))
            changed += int(not (old == value).all())
    conn.send((reads, torn, changed))


@pytest.mark.timeout(60)
def test_concurrent_writers_and_readers(store: SharedArrayStore) -> None:
    ctx: Any = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=stress_writer, args=(store, w, 1.5)) for w in (1, 2)]
    procs += [ctx.Process(target=stress_reader, args=(store, 1.5, c)) for _, c in pipes]
    for p in procs:
        p.start()
    results = [ours.recv() for ours, _ in pipes]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert sum(r[0] for r in results) > 0
    assert [r[1:] for r in results] == [(0, 0), (0, 0)]  # never torn, never changed
    before = store.stats()["mapped_bytes"]
    for key in store:
        store.delete(key)
    store.put("k", np.ones(10))  # everything the children used is reusable again
    assert store.stats()["mapped_bytes"] <= before


def fork_child_creates_store(conn: Any) -> None:
    s = SharedArrayStore()
    s.put("k", np.ones(1000))
    conn.send((os.getpid(), s.name))
    # exits without close: multiprocessing's exit hooks remove the store


@pytest.mark.timeout(60)
def test_store_created_in_child_removed_at_child_exit(mp_context: Any) -> None:
    ours, theirs = mp_context.Pipe()
    p = mp_context.Process(target=fork_child_creates_store, args=(theirs,))
    p.start()
    pid, name = ours.recv()
    p.join()
    assert p.exitcode == 0
    assert not [n for n in os.listdir(ix.SHM_DIR) if n.startswith(f"{ix.PREFIX}{pid}-{name}")]


@pytest.mark.timeout(60)
def test_os_fork_child_leaves_parent_store(store: SharedArrayStore) -> None:
    store.put("k", np.ones(10))
    pid = os.fork()
    if pid == 0:  # child: use the inherited handle, then exit without cleanup
        try:
            store.put("from_child", store.get("k") * 2)
            store.close()  # a copy of the owner's handle: just detaches
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert store.is_owner and store.get("from_child")[0] == 2.0


# -- refusals and fresh interpreters --------------------------------------------------------

CREATE_AND_WAIT = """
import sys, time, numpy as np
from polystore import SharedArrayStore
s = SharedArrayStore({name!r})
s.put("k", np.ones(1000))
print(s.name, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_attach_refuses_dead_owner() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATE_AND_WAIT.format(name="deadowner")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "deadowner"
        attached = SharedArrayStore.attach("deadowner")  # alive: fine
        attached.close()
    finally:
        proc.kill()
        proc.wait()
    try:
        with pytest.raises(StoreNotFoundError, match="dead"):
            SharedArrayStore.attach("deadowner")
        with pytest.raises(StorageError, match="gc"):
            SharedArrayStore("deadowner")
    finally:
        for name in os.listdir(ix.SHM_DIR):
            if name.startswith(f"{ix.PREFIX}{proc.pid}-deadowner."):
                os.unlink(os.path.join(ix.SHM_DIR, name))


@pytest.mark.timeout(60)
def test_store_of_a_killed_owner_takes_no_more_memory() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATE_AND_WAIT.format(name="orphaned")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "orphaned"
        attached = SharedArrayStore.attach("orphaned")
    finally:
        proc.kill()
        proc.wait()
    try:
        assert attached.get("k")[0] == 1.0  # what is there stays readable
        with pytest.raises(StorageError, match="died"):
            attached.put("new", np.ones(1 << 20))  # needs a new segment: refused
        # Free blocks of segments the store already has are used again
        # (nothing new would outlive it): "k" moves to another block of its
        # segment, and "k2" takes one too.
        attached.put("k", np.full(1000, 2.0))
        attached.put("k2", np.full(1000, 3.0))
        assert attached.get("k")[0] == 2.0 and attached.get("k2")[0] == 3.0
        attached.close()
    finally:
        for name in os.listdir(ix.SHM_DIR):
            if name.startswith(f"{ix.PREFIX}{proc.pid}-orphaned."):
                os.unlink(os.path.join(ix.SHM_DIR, name))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_attach_refuses_foreign_store(run_python: Any, store: SharedArrayStore) -> None:
    ctl = ix.ctl_path(ix.SHM_DIR, os.getpid(), store.name)
    os.chown(ctl, 4242, -1)
    try:
        out = run_python(
            f"""
            from polystore import SharedArrayStore, StorageError
            try:
                SharedArrayStore.attach({store.name!r})
            except StorageError as exc:
                print("refused:", exc)
            """
        )
        assert "refused" in out.stdout and "user" in out.stdout
    finally:
        os.chown(ctl, 0, -1)


EXIT_SCRIPT = """
import multiprocessing as mp, os, numpy as np
from polystore import SharedArrayStore


def child(store):
    view = store.get("k")
    store.put("child", view + 1)  # attached; exits holding a view


def main():
    kept = []
    stores = []
    for method in ("fork", "spawn", "forkserver"):
        s = SharedArrayStore()
        s.put("k", np.ones(1 << 16))
        p = mp.get_context(method).Process(target=child, args=(s,))
        p.start()
        p.join()
        assert p.exitcode == 0 and s.get("child")[0] == 2
        kept.append(s.get("k"))  # views alive at exit: no BufferError, no crash
        stores.append(s)  # owners alive at exit: removed by the exit hook
    mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"polystore-{os.getpid()}-")]
    print(os.getpid(), len(mine))
"""


@pytest.mark.timeout(120)
def test_no_tracker_warnings_and_clean_exit(run_python: Any, tmp_path: Any) -> None:
    (tmp_path / "shm_exit_script.py").write_text(EXIT_SCRIPT)
    out = run_python(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import shm_exit_script
        if __name__ == "__main__":
            shm_exit_script.main()
        """
    )
    assert out.stderr == ""
    pid, alive = map(int, out.stdout.split())
    assert alive >= 3  # the stores lived until the interpreter exited...
    assert not [
        n for n in os.listdir(ix.SHM_DIR) if n.startswith(f"{ix.PREFIX}{pid}-")
    ]  # ...not after


def test_a_locked_section_inside_another_in_one_thread_is_an_error(
    store: SharedArrayStore,
) -> None:
    a = store._arena
    with a.locked:
        with pytest.raises(RuntimeError, match="open in this thread"), a.locked:
            pass  # (it used to wait for itself for ever)
        assert a._holder is not None  # the outer section still holds the lock
    store.put("k", np.arange(3))  # and released it
