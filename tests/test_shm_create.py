"""SharedArrayStore.create: values written in place, published on exit; waiting for room."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import polystore
from polystore import SharedArrayStore, ShmFullError
from polystore._shm.check import problems

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("store_paths")]


@pytest.fixture
def store() -> Iterator[SharedArrayStore]:
    with SharedArrayStore(max_bytes=64 << 20) as store:
        yield store


def test_the_value_appears_whole_on_exit(store: SharedArrayStore) -> None:
    with store.create("a", (500, 4), np.float32) as out:
        assert out.shape == (500, 4) and out.dtype == np.float32 and out.flags.writeable
        assert out.flags.c_contiguous
        assert "a" not in store  # nobody sees it yet
        out[:] = 3
        store.put("other", np.ones(3))  # the store works meanwhile
        assert "a" not in store
    got = store.get("a")
    assert (got == 3).all() and got.shape == (500, 4)
    assert np.shares_memory(got, store.get("a"))
    assert not out.flags.writeable  # the published value is read-only for its writer too
    with pytest.raises(ValueError, match="read-only"):
        out[0, 0] = 1
    assert not problems(store._arena)


def test_an_exception_publishes_nothing_and_gives_the_memory_back(store: SharedArrayStore) -> None:
    store.put("a", np.zeros(10))
    before = store.stats()
    with pytest.raises(RuntimeError, match="boom"), store.create("a", 1 << 20, np.uint8) as out:
        out[:] = 9
        raise RuntimeError("boom")
    assert (store.get("a") == 0).all() and store.get("a").shape == (10,)
    del out
    store.trim()
    after = store.stats()
    assert after["keys"] == before["keys"] and not problems(store._arena)
    assert after["mapped_bytes"] - after["idle_bytes"] <= before["mapped_bytes"]


def test_orders_empty_and_zero_d(store: SharedArrayStore) -> None:
    with store.create("f", (3, 4), np.int16, order="F") as out:
        out[:] = np.arange(12).reshape(3, 4)
    assert store.get("f").flags.f_contiguous and store.get("f")[2, 3] == 11
    with store.create("empty", (0, 5), np.float64) as out:
        pass
    assert store.get("empty").shape == (0, 5)
    with store.create("scalar", (), np.complex64) as out:
        out[()] = 1 + 2j
    assert store.get("scalar")[()] == 1 + 2j
    with store.create("one", 7, ">i4") as out:
        out[:] = np.arange(7)
    assert store.get("one").dtype == np.dtype(">i4") and store.get("one")[6] == 6


@pytest.mark.parametrize(
    ("shape", "dtype", "error"),
    [
        ((-1, 3), np.float32, ValueError),
        ((2.5,), np.float32, TypeError),
        ("abc", np.float32, TypeError),
        ((3,), object, TypeError),
        ((3,), "not a dtype", TypeError),
        ((1 << 40,), np.float64, ValueError),  # larger than max_bytes: it could never fit
    ],
)
def test_bad_arguments_fail_before_anything_is_allocated(
    store: SharedArrayStore, shape: object, dtype: object, error: type[Exception]
) -> None:
    before = store.stats()
    with pytest.raises(error):
        store.create("k", shape, dtype)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        store.create("k", 3, order="X")  # type: ignore[arg-type]
    assert store.stats() == before


def test_overwrite_false_and_the_last_publisher(store: SharedArrayStore) -> None:
    store.put("k", np.zeros(3))
    with pytest.raises(FileExistsError):
        store.create("k", 3, overwrite=False).__enter__()
    # someone else publishes the key while we write: the first to publish wins
    with pytest.raises(FileExistsError), store.create("new", 3, overwrite=False) as out:
        out[:] = 1
        store.put("new", np.full(3, 2.0))
    assert (store.get("new") == 2).all()
    # with overwrite, the last to publish wins
    with store.create("new", 3) as out:
        out[:] = 5
        store.put("new", np.full(3, 4.0))
    assert (store.get("new") == 5).all()
    assert not problems(store._arena)


def test_the_writers_array_stays_as_published_after_an_overwrite(store: SharedArrayStore) -> None:
    with store.create("k", 1000, np.int64) as out:
        out[:] = 1
    for i in range(5):
        store.put("k", np.full(1000, 10 + i, np.int64))  # the old block stays pinned by `out`
    assert (out == 1).all()
    del out
    assert not problems(store._arena)


# -- waiting for room ------------------------------------------------------------


def _consume(name: str, keys: list[str], delay: float) -> None:  # pragma: no cover - child
    store = SharedArrayStore.attach(name)
    time.sleep(delay)
    for key in keys:
        store.delete(key)
    store.close()


@pytest.mark.parametrize("how", ["put", "create"])
def test_a_full_store_waits_for_a_consumer_to_free_room(how: str) -> None:
    with SharedArrayStore(max_bytes=8 << 20, cache_bytes=0) as store:
        keys = []
        with pytest.raises(ShmFullError):
            for i in range(20):
                store.put(f"k{i}", np.ones(1 << 17))  # 1 MiB: a segment each
                keys.append(f"k{i}")
        with pytest.raises(ShmFullError):  # timeout=0, the default: at once
            store.put("more", np.ones(1 << 17))
        with pytest.raises(ShmFullError):  # nobody frees anything within the timeout
            store.put("more", np.ones(1 << 17), timeout=0.05)
        consumer = mp.get_context("fork").Process(target=_consume, args=(store.name, keys[:2], 0.2))
        consumer.start()
        try:
            if how == "put":
                store.put("more", np.full(1 << 17, 2.0), timeout=60)
            else:
                with store.create("more", 1 << 17, timeout=60) as out:
                    out[:] = 2.0
        finally:
            consumer.join(30)
        assert consumer.exitcode == 0
        assert (store.get("more") == 2).all() and "k0" not in store
        assert not problems(store._arena)


def test_a_value_that_can_never_fit_does_not_wait() -> None:
    with SharedArrayStore(max_bytes=4 << 20) as store, pytest.raises(ShmFullError):
        store.put("big", np.ones(1 << 20), timeout=None)  # 8 MiB > max_bytes


def test_timeout_is_checked() -> None:
    with SharedArrayStore() as store:
        with pytest.raises(ValueError, match="timeout"):
            store.put("k", np.ones(2), timeout=-1)
        with pytest.raises(TypeError, match="timeout"):
            store.create("k", 2, timeout="soon")  # type: ignore[arg-type]


def _delete_paths(backend: Any, paths: list[str], delay: float) -> None:  # pragma: no cover
    time.sleep(delay)
    for path in paths:
        backend.delete(path)
    backend.close()


@pytest.mark.parametrize("which", ["shm", "memory"])
def test_backends_pass_timeout_to_the_store(which: str) -> None:
    with polystore.shared_registry(max_bytes=8 << 20) as registry:
        fm = polystore.FileManager(registry)
        paths = []
        with pytest.raises(ShmFullError):
            for i in range(20):
                fm.save(np.ones(1 << 17), f"full/{i}.npy", backend=which)
                paths.append(f"full/{i}.npy")
        consumer = mp.get_context("fork").Process(
            target=_delete_paths, args=(registry[which], paths[:3], 0.2)
        )
        consumer.start()
        try:
            fm.save(np.full(1 << 17, 2.0), "more.npy", backend=which, timeout=60)
            with fm.create_array("made.npy", 1 << 17, "f8", backend=which, timeout=60) as out:
                out[:] = 3
        finally:
            consumer.join(30)
        assert (fm.load("more.npy", backend=which) == 2).all()
        assert (fm.load("made.npy", backend=which) == 3).all()


def test_reserving_many_small_blocks_keeps_the_journal_short() -> None:
    # 8192 blocks freed in one locked section would overflow the undo journal
    with SharedArrayStore(max_blocks=16384) as store:
        assert store.reserve(512 << 20, 64 << 10) >= 512 << 20
        assert not problems(store._arena)
        store.put("k", np.ones(8192))
