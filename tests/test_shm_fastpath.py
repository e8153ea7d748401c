"""The C fast path of SharedArrayStore: what it takes, what it declines, and that it agrees.

The rest of the store's tests run with and without it (the ``store_paths``
fixture); these check the fast path itself.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polystore import SharedArrayStore
from polystore._shm import fast as _shm_fast
from polystore._shm import keys
from polystore._shm import layout as ix
from polystore._shm import write as _shm_write
from polystore._shm.check import problems
from polystore._shm.tables import Tables

needs_c = pytest.mark.skipif(not _shm_fast.AVAILABLE, reason="the C fast path is not built")


def test_the_fast_path_is_built_where_it_is_required() -> None:
    # CI sets POLYSTORE_REQUIRE_FASTPATH=1, so that a broken build of the
    # extension cannot pass unnoticed as a pure-Python run.
    if os.environ.get("POLYSTORE_REQUIRE_FASTPATH", "") not in ("", "0"):
        assert _shm_fast.AVAILABLE
        from polystore._shm import _fastpath

        assert hasattr(_fastpath, "Ctl")


class Counted:
    """Counts the Python store-lock sections and lookups of one store."""

    def __init__(self, store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.arena = a = store._arena
        self.locked = self.finds = 0
        acquire, find = a.acquire, a.find

        def counted_acquire(blocking: bool = True) -> bool:
            self.locked += 1
            return acquire(blocking)

        def counted_find(kbz: bytes, h: int) -> tuple[int, int]:
            self.finds += 1
            return find(kbz, h)

        monkeypatch.setattr(a, "acquire", counted_acquire)
        monkeypatch.setattr(a, "find", counted_find)

    def python_ran(self) -> bool:
        ran = bool(self.locked or self.finds)
        self.locked = self.finds = 0
        return ran


@pytest.fixture
def c_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[SharedArrayStore]:
    monkeypatch.setattr(_shm_fast, "ENABLED", True)
    with SharedArrayStore() as store:
        assert store._arena.fast is not None
        yield store


@needs_c
def test_the_steady_state_runs_in_c(
    c_store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_store.put("k", np.zeros(2048, np.float32))
    c_store.get("k")  # caches the value's description in this process
    spy = Counted(c_store, monkeypatch)
    for i in range(5):
        c_store.put("k", np.full(2048, i, np.float32))
        assert not spy.python_ran()
        view = c_store.get("k")
        assert not spy.python_ran()
        assert view.dtype == np.float32 and view.shape == (2048,)
        assert (view == i).all() and not view.flags.writeable
        del view
    assert c_store._arena.meta  # one cached description, still valid


@needs_c
def test_a_put_in_c_leaves_views_of_the_old_value_alone(
    c_store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_store.put("k", np.zeros(2048, np.float32))
    c_store.put("k", np.zeros(2048, np.float32))  # a second free block of its class
    held = [c_store.get("k")]
    spy = Counted(c_store, monkeypatch)
    for i in range(1, 4):
        c_store.put("k", np.full(2048, i, np.float32))
        assert not spy.python_ran()  # the old block is retired in C, not overwritten
        held.append(c_store.get("k"))
    for i, view in enumerate(held):
        assert (view == i).all()


@needs_c
@pytest.mark.parametrize(
    "case",
    ["new key", "other shape", "other dtype", "bytes", "fortran", "empty", "large", "no overwrite"],
)  # fmt: skip
def test_every_other_put_goes_to_python(
    c_store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    base = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    c_store.put("k", base)
    spy = Counted(c_store, monkeypatch)
    key, value, held = "k", base + 1, None
    kwargs: dict[str, Any] = {}
    if case == "new key":
        key = "other"
    elif case == "other shape":
        value = value.reshape(32, 128)
    elif case == "other dtype":
        value = value.astype(np.int32)
    elif case == "fortran":
        value = np.asfortranarray(value)
    elif case == "empty":
        value = np.zeros((0, 64), np.float32)
    elif case == "large":
        value = np.ones(_shm_write.SMALL_PUT // 4 + 1, np.float32)
    elif case == "no overwrite":
        kwargs = {"overwrite": False}
    if case == "bytes":
        c_store.put_bytes("k", value.tobytes())
        assert spy.python_ran()
        assert c_store.get_bytes("k") == value.tobytes()
        return
    if case == "no overwrite":
        with pytest.raises(FileExistsError):
            c_store.put(key, value, **kwargs)
        assert spy.python_ran()
        assert np.array_equal(c_store.get("k"), base)
        return
    c_store.put(key, value)
    assert spy.python_ran()
    got = c_store.get(key)
    assert np.array_equal(got, value) and got.dtype == value.dtype
    if case == "fortran":
        assert got.flags.f_contiguous and not got.flags.c_contiguous
    if held is not None:
        assert np.array_equal(held, base)  # the reader's view did not change


@needs_c
def test_a_get_without_the_cached_description_decodes_it_in_c(
    c_store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_store.put("k", np.arange(10.0))
    c_store.get("k")
    c_store._arena.meta.clear()  # as for a key this process meets for the first time
    spy = Counted(c_store, monkeypatch)
    assert np.array_equal(c_store.get("k"), np.arange(10.0))
    assert not spy.python_ran()  # a dtype decoded before: C describes the value itself
    c_store._arena.meta.clear()
    known = dict(ix.DTYPES)
    ix.DTYPES.clear()  # a dtype text no one decoded in this process: Python decodes it
    try:
        assert np.array_equal(c_store.get("k"), np.arange(10.0))
        assert spy.python_ran()
    finally:
        ix.DTYPES.update(known)
    assert np.array_equal(c_store.get("k"), np.arange(10.0))
    assert not spy.python_ran()
    with pytest.raises(KeyError):
        c_store.get("absent")
    assert not spy.python_ran()  # an absent key is told in C


@needs_c
def test_a_get_while_a_writer_holds_the_lock_goes_to_python(c_store: SharedArrayStore) -> None:
    c_store.put("k", np.arange(10.0))
    c_store.get("k")
    a = c_store._arena
    kbz, h = b"k\0", Tables.ht_hash(b"k")
    a.acquire()
    try:
        assert a.fast.get(a, kbz, h) is False
    finally:
        a.release()
    view, flags = a.fast.get(a, kbz, h)  # the view, pinned and watched in the same call
    assert np.array_equal(view, np.arange(10.0)) and flags == 0
    assert a.pins_np[a.slot].sum() == 1  # pinned once, for the view
    del view
    assert not a.pins_np.any()  # unpinned when it died
    # another epoch (segments unlinked meanwhile): Python prunes its mappings first
    a._epoch += 1
    assert a.fast.get(a, kbz, h) is False
    a._epoch -= 1
    assert not a.pins_np.any()


@needs_c
def test_a_small_put_in_c_declines_what_python_must_decide(c_store: SharedArrayStore) -> None:
    value = np.ones(2048, np.float32)
    c_store.put("k", value)
    a = c_store._arena
    seq = a.h[ix.H_SEQ]
    assert a.fast.put_small(a, "k", value * 3) is True
    assert a.h[ix.H_SEQ] == seq + 1 and (c_store.get("k") == 3).all()
    assert a.h[ix.H_WSEQ] % 2 == 0 and a.h[ix.H_LOG_LEN] == 0  # committed, unlocked
    # not for another dtype, shape or layout, nor without the cached description,
    # nor without the segment mapped for writing, nor while another thread is in
    for other in (value.astype(np.int32), value.reshape(64, 32), value[::2], value[:5]):
        assert a.fast.put_small(a, "k", other) is False
    meta, rw_maps = dict(a.meta), dict(a.rw_maps)
    a.meta.clear()
    assert a.fast.put_small(a, "k", value) is False
    a.meta.update(meta)
    a.rw_maps.clear()
    assert a.fast.put_small(a, "k", value) is False
    a.rw_maps.update(rw_maps)
    with a._lock:
        assert a.fast.put_small(a, "k", value) is False
    assert a._holder is None and not a._lock.locked()
    # a lock holder that died left work (an odd counter, a journal): Python recovers first
    a.q[ix.H_WSEQ] += 1
    assert a.fast.put_small(a, "k", value) is False
    a.q[ix.H_WSEQ] += 1
    a.q[ix.H_LOG_LEN] = 1
    a.q[a.L0], a.q[a.L0 + 1] = ix.H_SEQ, a.h[ix.H_SEQ]  # undoing it changes nothing
    assert a.fast.put_small(a, "k", value) is False
    c_store.put("k", value * 4)  # recovers, then puts
    assert a.h[ix.H_LOG_LEN] == 0 and (c_store.get("k") == 4).all()
    # another process holding the lock (here: another open file description):
    # the C put does not wait, the Python path does
    other = os.open(a.path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert a.fast.put_small(a, "k", value * 5) is False
        assert (c_store.get("k") == 4).all()
        fcntl.flock(other, fcntl.LOCK_UN)
        assert a.fast.put_small(a, "k", value * 5) is True
        assert (c_store.get("k") == 5).all()
    finally:
        os.close(other)


@needs_c
def test_c_writes_decline_unless_the_related_keys_are_as_required(
    c_store: SharedArrayStore,
) -> None:
    """The guards of a file's value: keys that must be absent, keys that must be there.

    A put or publish runs in C only when nothing else is to do in its step:
    the keys to remove (old metadata) and those in the way (a file where a
    directory goes) absent, the keys to make (directories) present, all
    checked in the same locked section. Otherwise Python does it all.
    """
    key = keys.key_parts
    a = c_store._arena
    value = np.ones(2048, np.float32)
    c_store.put("k", value)
    c_store.put_bytes("k.meta", b"{}")
    c_store.put_bytes("d/", b"")
    seq = a.h[ix.H_SEQ]
    assert a.fast.put_small(a, "k", value * 2, (key("k.meta"),)) is False  # present
    assert a.fast.put_small(a, "k", value * 2, (), (key("e/"),)) is False  # absent
    assert a.h[ix.H_SEQ] == seq and (c_store.get("k") == 1).all()  # nothing changed
    assert a.fast.put_small(a, "k", value * 2) is True  # no guard
    assert a.fast.put_small(a, "k", value * 3, (key("other"),), (key("d/"),)) is True
    for bad in ("k.meta", (b"x",), ((b"x", b"x", -1),), ((b"x", "x\0", 1),)):
        assert a.fast.put_small(a, "k", value, bad) is False  # not key parts: Python decides
    with pytest.raises(ValueError):
        c_store.update({"k": value}, remove=[""])
    c_store.update({"k": value * 4}, remove=["k.meta"])  # Python removes it, in one step
    assert (c_store.get("k") == 4).all() and "k.meta" not in c_store
    c_store.update({"k": value * 5}, remove=["k.meta"])  # in C now
    assert (c_store.get("k") == 5).all() and a.h[ix.H_SEQ] == seq + 4

    # the same for a create's publish
    shape, dt, nbytes = (8, 8), ix.encode_dtype(np.dtype(np.float64)), 512
    parts = key("new")
    c_store.put_bytes("new.meta", b"{}")
    b = _shm_write.take(a, ix.class_of(nbytes), 0, [])

    def publish(absent: tuple[Any, ...], present: tuple[Any, ...]) -> bool:
        return a.fast.publish(a, parts[1], parts[2], b, nbytes, dt, shape, 0, absent, present)

    assert publish((key("new.meta"),), ()) is False
    assert publish((), (key("e/"),)) is False
    assert "new" not in c_store
    c_store.delete("new.meta")
    assert publish((key("new.meta"),), (key("d/"),)) is True
    assert c_store.get("new").shape == shape
    with pytest.raises(TypeError):
        a.fast.publish(a, parts[1], parts[2], b, nbytes, dt, shape, 0, (), (), ())  # 11
    assert not problems(a)


@needs_c
def test_take_and_publish_in_c_decline_what_python_must_decide(
    c_store: SharedArrayStore,
) -> None:
    a = c_store._arena
    shape, dt = (512, 512), ix.encode_dtype(np.dtype(np.float32))
    nbytes, cls = 512 * 512 * 4, ix.class_of(512 * 512 * 4)
    for i in range(3):  # free blocks of the class, and free entry records
        c_store.put(f"w{i}", np.zeros(shape, np.float32))
    for i in range(3):
        c_store.delete(f"w{i}")
    parts = keys.key_parts("new")

    def publish(b: int) -> bool:
        return a.fast.publish(a, parts[1], parts[2], b, nbytes, dt, shape, 0)

    def declines() -> None:
        before = (a.h.tolist(), a.blk_np.copy())
        assert a.fast.take(a, cls, []) == -1
        assert publish(0) is False  # (block 0 is not this process's: refused anyway)
        assert a.h.tolist() == before[0]  # nothing changed, not even the counter
        assert np.array_equal(a.blk_np, before[1])

    # no free block of the class, or a class out of range: Python decides
    assert a.fast.take(a, ix.N_CLASSES, []) == -1 and a.fast.take(a, -1, []) == -1
    with a._lock:  # another thread of this process is in the store
        declines()
    a.q[ix.H_WSEQ] += 1  # a lock holder died inside a section
    declines()
    a.q[ix.H_WSEQ] += 1
    a.q[ix.H_LOG_LEN] = 1  # ... and left a journal
    a.q[a.L0], a.q[a.L0 + 1] = ix.H_SEQ, a.h[ix.H_SEQ]  # undoing it changes nothing
    declines()
    c_store.put("k", np.ones(3))  # Python recovers
    assert a.h[ix.H_LOG_LEN] == 0
    other = os.open(a.path, os.O_RDWR)  # another process holds the lock
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        declines()
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)
    # all clear: a block taken in C is this process's to fill, and published in C
    taken: list[int] = []
    b = a.fast.take(a, cls, taken)
    assert b >= 0 and taken == [b]  # noted in the same call that takes it
    assert a.bq[b * ix.BLK_FIELDS + ix.B_STATE] == ix.WRITING
    assert a.bq[b * ix.BLK_FIELDS + ix.B_OWNER] == a.slot
    assert publish(b) is True and "new" in c_store
    assert a.bq[b * ix.BLK_FIELDS + ix.B_STATE] == ix.LIVE
    assert c_store.get("new").shape == shape
    b2 = a.fast.take(a, cls, [])
    assert publish(b2) is False  # the key exists now: Python replaces it
    _shm_write.abandon(a, b2)
    assert not problems(a)


@needs_c
def test_a_remove_in_c_declines_what_python_must_decide(c_store: SharedArrayStore) -> None:
    a = c_store._arena
    for key in ("k", "other"):  # "other" keeps the segment of "k" in use
        c_store.put(key, np.arange(1000.0))
    _, kbz, h = keys.key_parts("k")
    b = a.eq[a.find(kbz, h)[1] * (ix.ENT_SIZE // 8) + ix.E_BLOCK]
    head = ix.H_CLASS0 + a.bq[b * ix.BLK_FIELDS + ix.B_CLS]

    def declines() -> None:
        before = [v for i, v in enumerate(a.h.tolist()) if i != ix.H_WSEQ]
        tables = (a.ht_np.copy(), a.blk_np.copy())
        assert a.fast.remove(a, kbz, h) is None
        assert [v for i, v in enumerate(a.h.tolist()) if i != ix.H_WSEQ] == before
        assert np.array_equal(a.ht_np, tables[0]) and np.array_equal(a.blk_np, tables[1])
        assert a.h[ix.H_WSEQ] % 2 == 0 and a.h[ix.H_LOG_LEN] == 0

    with a._lock:  # another thread of this process is in the store
        declines()
    saved = a.q[head]
    a.q[head] = a.layout.max_blocks + 5  # a free list whose head it cannot check
    declines()
    a.q[head] = saved
    a.q[b * ix.BLK_FIELDS + ix.B_STATE + a.B0] = ix.RETIRED  # a block not LIVE
    declines()
    a.q[b * ix.BLK_FIELDS + ix.B_STATE + a.B0] = ix.LIVE
    cache = a.q[ix.H_CACHE_BYTES]
    c_store.delete("other")  # now removing "k" leaves its segment idle ...
    a.q[ix.H_CACHE_BYTES] = 0  # ... beyond the cache: Python evicts it
    declines()
    a.q[ix.H_CACHE_BYTES] = cache
    # an absent key: False with nothing changed; all clear: removed in C
    assert a.fast.remove(a, *keys.key_parts("absent")[1:]) is False
    assert a.fast.remove(a, kbz, h, *keys.key_parts("k")[1:]) is None  # itself as companion
    assert a.fast.remove(a, kbz, h) is True and "k" not in c_store
    assert not problems(a)


@needs_c
def test_a_view_in_c_declines_what_python_must_make(c_store: SharedArrayStore) -> None:
    c_store.put("k", np.arange(10.0))
    c_store.put("empty", np.zeros((0, 3)))
    c_store.get("k")
    c_store.get("empty")
    a = c_store._arena
    refs = a._refs

    def view(key: object, mapped: bool = True) -> Any:
        saved = dict(a.ro_maps)  # the C view holds the arena's dict itself
        if not mapped:
            a.ro_maps.clear()
        try:
            return a.fast.view(a, key)
        finally:
            a.ro_maps.update(saved)

    assert view("empty") is False  # a new empty array each time: Python makes it
    assert view("k", mapped=False) is False  # its segment not mapped here yet
    absent = f"absent-{os.urandom(8).hex()}"
    assert view(absent) is None  # a valid key met for the first time: told in C
    assert view("") is False  # not a valid key: Python raises the ValueError
    assert view("\ud800") is False  # not UTF-8: Python encodes it its own way
    assert view(b"k") is False  # not a str: Python raises the TypeError
    assert not a.pins_np.any() and not refs
    got = view("k")
    assert np.array_equal(got, np.arange(10.0)) and not got.flags.writeable
    assert a.pins_np.sum() == 1 and len(refs) == 1
    del got
    assert not a.pins_np.any() and not refs


@needs_c
def test_the_c_view_checks_its_arguments(c_store: SharedArrayStore) -> None:
    from polystore._shm import _fastpath

    c_store.put("k", np.arange(3.0))
    a = c_store._arena
    with pytest.raises(ValueError, match="does not fit"):
        _fastpath.Ctl(
            bytearray(4096), (0, 8, 16, 24, 32, 40, 48), (7, 1, 1, 1, 1), _shm_fast._FIELDS,
            (64,), 0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="offsets"):
        _fastpath.Ctl(bytearray(4096), (0,), (7, 1, 1, 1, 1), _shm_fast._FIELDS, (64,), 0)
    with pytest.raises(ValueError, match="increase"):
        _fastpath.Ctl(a._whole, (0,) * 7, (7, 1, 1, 1, 1), _shm_fast._FIELDS, (64, 64), 0)
    with pytest.raises(TypeError):
        a.fast.get(a, "k", 0)
    with pytest.raises(TypeError):
        a.fast.put_small(a, "k")
    with pytest.raises(AttributeError):
        a.fast.view(object(), "k")
    slot = a.slot
    a.slot = -1
    assert a.fast.view(a, "k") is False  # no row in the pin table
    a.slot = slot
    ctl = _shm_fast.make_ctl(a._whole, a.layout)
    with pytest.raises(RuntimeError, match="bind"):
        ctl.get(a, b"k\0", 0)
    ctl.bind(a.meta, a.ro_maps, a.rw_maps, a._refs, a.view_dead, ix.DTYPES)
    with pytest.raises(IndexError):
        ctl.pin_add(-1, 1)
    pin_base = a.pin_base
    a.pin_base = -8
    assert ctl.get(a, b"\0\0", 0) is False  # not a row of the pin table
    a.pin_base = pin_base
    ctl.release()
    with pytest.raises(ValueError, match="released"):
        ctl.get(a, b"k\0", 0)


# -- the two paths agree ---------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill, dtype),
    st.sampled_from([(16,), (4, 4), (2048,), (0,)]),
    st.sampled_from([np.float32, np.int64, np.uint8]),
    st.integers(0, 100),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, VALUES),
        st.tuples(st.just("create"), KEYS, VALUES),  # made in place, published on exit
        st.tuples(st.just("abandon"), KEYS, VALUES),  # made in place, abandoned
        st.tuples(st.just("get"), KEYS, st.booleans()),  # True: hold the view
        st.tuples(st.just("delete"), KEYS, st.none()),
        st.tuples(st.just("drop"), st.none(), st.none()),  # drop every held view
        # update: put one key and remove another (in C when that one is absent)
        st.tuples(st.just("update"), KEYS, st.tuples(VALUES, KEYS)),
        st.tuples(st.just("rename"), KEYS, KEYS),
        # a file's delete: a key and its companion (metadata) in one section
        st.tuples(st.just("remove_with"), KEYS, KEYS),
    ),
    max_size=40,
)


class _Abandoned(Exception):
    """Raised inside a create() block to abandon it."""


def _run(store: SharedArrayStore, ops: list[tuple[str, Any, Any]]) -> list[Any]:
    out: list[Any] = []
    held: list[np.ndarray] = []
    for op, key, arg in ops:
        try:
            if op == "put":
                store.put(key, arg)
                out.append(None)
            elif op in ("create", "abandon"):
                try:
                    with store.create(key, arg.shape, arg.dtype) as made:
                        made[...] = arg
                        if op == "abandon":
                            raise _Abandoned
                except _Abandoned:
                    pass
                del made
                out.append(None)
            elif op == "get":
                view = store.get(key)
                out.append((view.dtype.str, view.shape, view.tobytes()))
                if arg:
                    held.append(view)
            elif op == "delete":
                store.delete(key)
                out.append(None)
            elif op == "update":
                value, gone = arg
                if gone != key:
                    store.update({key: value}, remove=[gone])
                out.append(None)
            elif op == "rename":
                store.rename(key, arg)
                out.append(None)
            elif op == "remove_with":
                out.append(store._remove_with(key, arg) if arg != key else None)
            else:
                held.clear()
        except KeyError:
            out.append("KeyError")
    out.append([(v.shape, v.tobytes()) for v in held])  # held views never change
    out.append(sorted(store.keys()))
    return out


def _tables(store: SharedArrayStore) -> dict[str, Any]:
    a = store._arena
    return {
        "ht": a.ht_np.copy(),
        "entries": np.frombuffer(a.eb, np.uint8).copy(),
        "blocks": a.blk_np[: a.h[ix.H_BLK_HW]].copy(),
        "header": [a.h[f] for f in (ix.H_SEQ, ix.H_NKEYS, ix.H_ENT_HW, ix.H_BLK_HW, ix.H_IDLE)],
    }


@needs_c
@settings(max_examples=30)  # two fresh stores per example
@given(ops=OPS)
def test_c_and_python_paths_agree(ops: list[tuple[str, Any, Any]]) -> None:
    results, tables = [], []
    for enabled in (True, False):
        old = _shm_fast.ENABLED
        _shm_fast.ENABLED = enabled
        try:
            with SharedArrayStore() as store:
                assert (store._arena.fast is not None) == enabled
                results.append(_run(store, ops))
                tables.append(_tables(store))
        finally:
            _shm_fast.ENABLED = old
    assert results[0] == results[1]
    c, py = tables
    assert c["header"] == py["header"]
    for name in ("ht", "entries", "blocks"):
        assert np.array_equal(c[name], py[name]), name


@needs_c
@pytest.mark.parametrize(
    "value",
    [
        np.arange(12.0).reshape(3, 4),
        np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
        np.array(7.5, np.float32),  # 0-d
        np.arange(5, dtype=">i4"),  # big-endian
        np.zeros(3, dtype=[("x", np.float32), ("y", np.int8)]),  # structured
        np.array([True, False]),
        np.arange(6, dtype=np.complex64).reshape(2, 3)[:, ::-1].copy(),
    ],
    ids=["2d", "fortran-3d", "0d", "big-endian", "structured", "bool", "complex"],
)
def test_views_made_in_c_are_the_views_python_makes(
    value: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = []
    for enabled in (True, False):
        monkeypatch.setattr(_shm_fast, "ENABLED", enabled)
        with SharedArrayStore() as store:
            store.put("k", value)
            store.get("k")  # the description is cached from the second get on
            spy = Counted(store, monkeypatch)
            view = store.get("k")
            assert spy.python_ran() != enabled
            views.append(
                (
                    view.dtype,
                    view.shape,
                    view.strides,
                    view.flags.writeable,
                    view.flags.c_contiguous,
                    view.flags.f_contiguous,
                    view.flags.aligned,
                    view.tobytes(order="A"),
                )
            )
            assert np.array_equal(view, value)
            derived = view.T[..., None]  # a view of the view keeps the block pinned
            del view
            assert store._arena.pins_np.sum() == 1
            del derived
            assert not store._arena.pins_np.any()
    assert views[0] == views[1]


@needs_c
@settings(max_examples=200)
@given(key=st.text(min_size=0, max_size=300))
def test_c_makes_a_keys_parts_as_python_does(key: str) -> None:
    """A key met first in C (``in``, ``get``) is cached with Python's bytes and hash."""

    with SharedArrayStore() as store:
        fast = store._arena.fast
        assert fast is not None
        keys.key_cache.pop(key, None)
        try:  # what Python makes of it, on its own
            kb = ix.encode_key(key)
        except ValueError:  # empty, too long, or with a NUL: C leaves it to Python
            assert fast.contains(key) is None and key not in keys.key_cache
            assert _shm_fast.key_parts is not None and _shm_fast.key_parts(key) is None
            return
        expected = (kb, kb + b"\0", zlib.crc32(kb) & 0x7FFFFFFF)
        keys.key_cache.pop(key, None)
        found = fast.contains(key)
        if found is None:  # only a lone surrogate (not UTF-8) is left to Python
            assert any(0xD800 <= ord(ch) <= 0xDFFF for ch in key)
        else:
            assert found is False and keys.key_cache[key] == expected


@needs_c
def test_in_runs_in_c(c_store: SharedArrayStore, monkeypatch: pytest.MonkeyPatch) -> None:
    c_store.put("k", np.arange(3.0))
    spy = Counted(c_store, monkeypatch)
    assert "k" in c_store and "new key" not in c_store
    assert not spy.python_ran()
    a = c_store._arena
    a.acquire()  # a writer inside: the counter is odd, the lookup goes to the lock
    try:
        assert a.fast.contains("k") is None
    finally:
        a.release()


@needs_c
def test_a_get_in_c_never_trusts_what_it_did_not_check(c_store: SharedArrayStore) -> None:
    """Whatever the shared entry says (written by any process, or torn), C uses
    a cached description only if it is one and its sequence number matches."""
    c_store.put("k", np.arange(6.0))
    c_store.get("k")
    a = c_store._arena
    e = a.find(*keys.key_parts("k")[1:])[1]
    k = e * ix.ENT_SIZE // 8 + ix.E_MSEQ
    saved = a.eq[k]
    a.meta.clear()
    a.q[a.E0 + k] = -1  # nothing cached, and a sequence number of -1
    try:
        view = c_store.get("k")
        assert np.array_equal(view, np.arange(6.0))
        del view
        a.meta[e] = "not a description"  # type: ignore[assignment]
        view = c_store.get("k")
        assert np.array_equal(view, np.arange(6.0))
        del view
    finally:
        a.q[a.E0 + k] = saved
        a.meta.clear()
    assert np.array_equal(c_store.get("k"), np.arange(6.0))
