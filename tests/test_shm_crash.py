"""A writer SIGKILLed at every step of every write path never corrupts the store.

Each scenario is one store operation. It first runs once in a forked child
that only counts its steps (``polystore._shm.faults``: every journaled store,
copy, commit, unlink and rollback is a step, in Python and in C); then, for
every step ``n``, a fresh child runs it again and SIGKILLs itself at step
``n``. After each kill the test process, as the survivor, checks:

* every invariant of the control segment and its files (``check.problems``,
  which takes the lock and so first rolls back what the dead child left);
* the keys the child did not touch hold exactly their values;
* the key it touched holds its old value or its new one, never a mix (values
  are self-describing: element 0 names the key, every other element is the
  version); keys it changed together (``SharedArrayStore.update``, a create
  published with more keys) are all old or all new;
* a probe put, get and delete works.

Then it puts the old state back for the next step.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import SharedArrayStore
from polystore._shm import fast as _shm_fast
from polystore._shm import faults
from polystore._shm import layout as ix
from polystore._shm.check import problems
from polystore._shm.keys import key_parts as store_key
from polystore._shm.tables import Tables
from polystore.formats import array_spec

pytestmark = pytest.mark.timeout(300)

N_SMALL = 1000  # int64 elements: 8 KB
N_LARGE = (3 << 20) // 8  # 3 MiB: the large put, copied outside the lock
STABLE = {f"s{i}": (i + 1, 64 * (i + 1)) for i in range(10)}  # key -> (id, elements)
HT_MASK = 63  # the hash table of the stores below (max_keys=24) has 64 slots


def _colliding(target: str, count: int) -> list[str]:
    """Keys whose probe runs start at the same slot as ``target``'s."""
    home = Tables.ht_hash(target.encode()) & HT_MASK
    found = []
    i = 0
    while len(found) < count:
        key = f"c{i}"
        if Tables.ht_hash(key.encode()) & HT_MASK == home:
            found.append(key)
        i += 1
    return found


#: stands for the test's temporary directory in Scenario.store_kwargs
SPILL = "<tmp_path>"

# After "t": deleting "t" moves them back along the run (backward-shift deletion).
COLLIDING = _colliding("t", 3)
STABLE.update({key: (50 + i, 8) for i, key in enumerate(COLLIDING)})


def value(kid: int, version: int, n: int) -> np.ndarray:
    """A self-describing array: element 0 is the key's id, the rest its version."""
    arr = np.full(n, version, np.int64)
    arr[0] = kid
    return arr


def version_of(store: SharedArrayStore, key: str, kid: int) -> int | None:
    """The version a key holds (None if absent); fails on a torn or foreign value."""
    try:
        view = store.get(key)
    except KeyError:
        return None
    arr = np.array(view).ravel()
    del view
    assert arr[0] == kid, f"{key!r} holds the value of key id {arr[0]}"
    assert (arr[1:] == arr[1]).all(), f"{key!r} is torn: versions {np.unique(arr[1:])}"
    return int(arr[1])


@dataclass
class Scenario:
    """One operation, the state it starts from, and the outcomes allowed after a kill."""

    name: str
    setup: Callable[[SharedArrayStore], None]
    op: Callable[[SharedArrayStore], Any]
    #: key -> (id, versions allowed after a kill; None: absent)
    allowed: dict[str, tuple[int, set[int | None]]]
    store_kwargs: dict[str, Any] = field(default_factory=dict)
    #: run in the child before arming, e.g. to hold a view
    prepare: Callable[[SharedArrayStore], Any] | None = None
    #: run in the survivor before each try, e.g. to leave a dead writer
    before: Callable[[SharedArrayStore], Any] | None = None
    #: the versions the touched keys may hold together (None: any combination)
    outcomes: list[dict[str, int | None]] | None = None
    #: the whole operation runs in C when the C path is built (and in Python without it)
    all_in_c: bool = False


def _put(key: str, kid: int, version: int, n: int = N_SMALL) -> Callable[[SharedArrayStore], None]:
    def run(store: SharedArrayStore) -> None:
        store.put(key, value(kid, version, n))

    return run


def _base(store: SharedArrayStore) -> None:
    assert store._arena.mask == HT_MASK
    store.put("t", value(100, 0, 3 * N_SMALL))  # the slab of the "new shape" scenario
    for key, (kid, n) in STABLE.items():
        store.put(key, value(kid, 7, n))
    store.put("t", value(100, 1, N_SMALL))
    store.put("L", value(101, 1, N_LARGE))
    store.get("t")  # caches the value's description: the C put can take over
    store.get("L")


def _create(key: str, kid: int, version: int, n: int) -> Callable[[SharedArrayStore], None]:
    def run(store: SharedArrayStore) -> None:
        with store.create(key, n, np.int64) as out:
            out[:] = version
            out[0] = kid

    return run


def _delete(key: str) -> Callable[[SharedArrayStore], None]:
    def run(store: SharedArrayStore) -> None:
        store.delete(key)

    return run


def _update(
    values: dict[str, tuple[int, int, int]], remove: tuple[str, ...] = ()
) -> Callable[[SharedArrayStore], None]:
    """store.update of ``values`` (key -> (id, version, elements)) and ``remove``."""

    def run(store: SharedArrayStore) -> None:
        store.update({k: value(*v) for k, v in values.items()}, remove=remove)

    return run


def _rename(src: str, dst: str) -> Callable[[SharedArrayStore], None]:
    def run(store: SharedArrayStore) -> None:
        store.rename(src, dst)

    return run


def _old_r(store: SharedArrayStore) -> None:
    """A key for "t" to be renamed onto, of another shape (in the child, before it is armed)."""
    store.put("r", value(100, 0, 16))


def _pair(store: SharedArrayStore) -> None:
    """A file and its metadata at version 1 (in the child, before it is armed)."""
    store.update({"f": value(110, 1, N_SMALL), "fm": value(111, 1, 8)})


def _create_with(store: SharedArrayStore) -> None:
    """A create published with a key put and a key removed, as a file with its metadata."""
    spec = array_spec(N_LARGE, np.int64)
    related = store._related({"cm": value(112, 1, 8)}, ["fm"])
    with store._create("c", spec, True, 0, lambda: related) as out:
        out[:] = 1
        out[0] = 104


def _remove_with(key: str, companion: str) -> Callable[[SharedArrayStore], Any]:
    """A file's delete: the key and its companion (metadata) in one step."""

    def run(store: SharedArrayStore) -> Any:
        assert store._remove_with(key, companion)

    return run


def _hold_view(store: SharedArrayStore) -> Any:
    return store.get("t")


def _dead_writer(store: SharedArrayStore) -> None:
    """Leave a dead process row: pins, a WRITING block and a segment being created."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies
        try:
            view = store.get("s0")  # pinned in its row
            faults.arm(-1)
            store.put("x", value(200, 1, N_LARGE))  # count the steps of a growing put
            total = faults.arm(0)
            store.delete("x")
            faults.arm(max(1, total // 2))  # then die half way through another
            store.put("y", value(201, 1, 5 << 17))
            del view
        finally:
            os._exit(0)
    _wait(pid)


# fmt: off
SCENARIOS = [
    Scenario("small put", _base, _put("t", 100, 2), {"t": (100, {1, 2})}, all_in_c=True),
    Scenario(
        "small put beside a view", _base, _put("t", 100, 2), {"t": (100, {1, 2})},
        prepare=_hold_view, all_in_c=True,
    ),
    Scenario("new key", _base, _put("n", 102, 1), {"n": (102, {None, 1})}),
    Scenario("new shape", _base, _put("t", 100, 2, 3 * N_SMALL), {"t": (100, {1, 2})}),
    Scenario("large put", _base, _put("L", 101, 2, N_LARGE), {"L": (101, {1, 2})}),
    Scenario(
        "growing put", _base, _put("g", 103, 1, 5 << 17), {"g": (103, {None, 1})},
        store_kwargs={"cache_bytes": 0},
    ),
    Scenario("create small", _base, _create("t", 100, 2, N_SMALL), {"t": (100, {1, 2})}),
    Scenario("create large", _base, _create("c", 104, 1, N_LARGE), {"c": (104, {None, 1})}),
    # A delete whose block stays in use by its segment: in C. Deleting "t"
    # shifts the keys colliding with it back along their probe run.
    Scenario("delete", _base, _delete("t"), {"t": (100, {None, 1})}, all_in_c=True),
    Scenario(
        "delete beside a view", _base, _delete("t"), {"t": (100, {None, 1})},
        prepare=_hold_view, all_in_c=True,
    ),
    Scenario(
        "remove a file and its metadata", _base, _remove_with("f", "fm"),
        {"f": (110, {1, None}), "fm": (111, {1, None})}, prepare=_pair,
        outcomes=[{"f": 1, "fm": 1}, {"f": None, "fm": None}], all_in_c=True,
    ),
    Scenario(
        "remove a file without metadata", _base, _remove_with("t", "tm"),
        {"t": (100, {None, 1})}, all_in_c=True,
    ),
    Scenario(  # its segment goes idle, kept for reuse (within cache_bytes): in C
        "delete into the cache", _base, _delete("L"), {"L": (101, {None, 1})}, all_in_c=True,
    ),
    Scenario(
        "delete and evict", _base, _delete("L"), {"L": (101, {None, 1})},
        store_kwargs={"cache_bytes": 0},
    ),
    Scenario(
        "reap a dead writer", _base, _put("g", 103, 1, 5 << 17), {"g": (103, {None, 1})},
        before=_dead_writer,
    ),
    Scenario(
        "spilled put", _base, _put("g", 103, 1, 5 << 17), {"g": (103, {None, 1})},
        store_kwargs={"cache_bytes": 0, "max_bytes": 8 << 20, "spill_dir": SPILL},
    ),
    # Keys changed together: all old or all new.
    Scenario(
        "update a pair", _base, _update({"f": (110, 2, N_SMALL), "fm": (111, 2, 8)}),
        {"f": (110, {1, 2}), "fm": (111, {1, 2})}, prepare=_pair,
        outcomes=[{"f": 1, "fm": 1}, {"f": 2, "fm": 2}],
    ),
    Scenario(
        "update and remove", _base, _update({"f": (110, 2, N_LARGE)}, ("fm",)),
        {"f": (110, {1, 2}), "fm": (111, {1, None})}, prepare=_pair,
        outcomes=[{"f": 1, "fm": 1}, {"f": 2, "fm": None}],
    ),
    Scenario(
        # f's old entry record is freed by its new shape before fn takes one
        "update: a new shape and a new key", _base,
        _update({"f": (110, 2, 3 * N_SMALL), "fn": (113, 1, 8)}),
        {"f": (110, {1, 2}), "fn": (113, {None, 1})}, prepare=_pair,
        outcomes=[{"f": 1, "fn": None}, {"f": 2, "fn": 1}],
    ),
    Scenario(
        "rename to a new key", _base, _rename("t", "r"),
        {"t": (100, {1, None}), "r": (100, {None, 1})},
        outcomes=[{"t": 1, "r": None}, {"t": None, "r": 1}],
    ),
    Scenario(
        "rename onto a key", _base, _rename("t", "r"),
        {"t": (100, {1, None}), "r": (100, {0, 1})}, prepare=_old_r,
        outcomes=[{"t": 1, "r": 0}, {"t": None, "r": 1}],
    ),
    Scenario(
        "remove a pair", _base, _update({}, ("f", "fm")),
        {"f": (110, {1, None}), "fm": (111, {1, None})}, prepare=_pair,
        outcomes=[{"f": 1, "fm": 1}, {"f": None, "fm": None}],
    ),
    Scenario(
        "create with more keys", _base, _create_with,
        {"c": (104, {None, 1}), "cm": (112, {None, 1}), "fm": (111, {1, None})},
        prepare=_pair, outcomes=[{"c": None, "cm": None, "fm": 1}, {"c": 1, "cm": 1, "fm": None}],
    ),
    # The steady state of a file saved again with no metadata: in C, which
    # checks in the same section that there is no metadata to remove.
    Scenario(
        "small put, nothing to remove", _base, _update({"t": (100, 2, N_SMALL)}, ("fm",)),
        {"t": (100, {1, 2})}, all_in_c=True,
    ),
]
# fmt: on


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _in_child(store: SharedArrayStore, sc: Scenario, at: int, c_path: bool) -> tuple[int, int, int]:
    """Run the scenario's operation in a forked child armed to die at step ``at``.

    Returns how the child ended, and the steps it counted in Python and in C
    when it did not die.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            if not c_path:
                store._arena.fast = None
            len(store)  # a forked child opens the control file again on first use
            held = sc.prepare(store) if sc.prepare else None
            faults.arm(at)
            sc.op(store)
            in_python = faults.steps
            os.write(w, struct.pack("qq", in_python, faults.arm(0) - in_python))
            del held
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        status = _wait(pid)
        data = os.read(r, 16)
    finally:
        os.close(r)
    in_python, in_c = struct.unpack("qq", data) if len(data) == 16 else (0, 0)
    return status, in_python, in_c


def _survivor_checks(store: SharedArrayStore, sc: Scenario, label: str) -> None:
    # First, before anything takes the lock and repairs the dead writer's
    # section: a lock-free `in` must see through it (the write counter it
    # left odd sends the lookup to the lock).
    for key in STABLE:
        assert key in store, f"{label}: untouched key {key} not found"
    for key, (_, versions) in sc.allowed.items():
        if None not in versions:
            assert key in store, f"{label}: {key} not found"
        elif versions == {None}:
            assert key not in store, f"{label}: {key} found"
    found = problems(store._arena)
    assert not found, f"{label}: {found}"
    for key, (kid, n) in STABLE.items():
        assert version_of(store, key, kid) == 7, f"{label}: untouched key {key} changed"
        assert store.info(key).shape == (n,)
    held = {}
    for key, (kid, versions) in sc.allowed.items():
        got = held[key] = version_of(store, key, kid)
        assert got in versions, f"{label}: {key} holds version {got}, allowed {versions}"
    if sc.outcomes is not None:
        assert held in sc.outcomes, f"{label}: the keys hold {held}, allowed {sc.outcomes}"
    store.put("probe", np.arange(5))
    assert np.array_equal(store.get("probe"), np.arange(5))
    store.delete("probe")


def _restore(store: SharedArrayStore) -> None:
    """Put the state every scenario starts from back (after _base)."""
    with store._arena.locked as a:
        a.reap()  # what a killed child held, at once, so that every try starts alike
    for key in ("n", "g", "x", "y", "c", "f", "fm", "fn", "cm", "r"):
        if key in store:
            store.delete(key)
    if "t" not in store:  # "t" goes back before the keys that collide with it
        for key in COLLIDING:
            store.delete(key)
        store.put("t", value(100, 1, N_SMALL))
        for key in COLLIDING:
            store.put(key, value(STABLE[key][0], 7, STABLE[key][1]))
    store.put("t", value(100, 1, N_SMALL))
    store.put("L", value(101, 1, N_LARGE))
    store.get("t")
    store.get("L")


PATHS = ["python", "c"] if _shm_fast.AVAILABLE else ["python"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_kill_at_every_step_leaves_the_store_whole(
    sc: Scenario, path: str, tmp_path: Path
) -> None:
    kwargs = {"max_keys": 24, "max_blocks": 1024, "max_segs": 64, **sc.store_kwargs}
    if kwargs.get("spill_dir") == SPILL:
        kwargs["spill_dir"] = tmp_path
    with SharedArrayStore(**kwargs) as store:
        sc.setup(store)
        steps = 0
        for _ in range(2):  # the second count is the steady state the kills start from
            _restore(store)
            if sc.before:
                sc.before(store)
            status, in_python, in_c = _in_child(store, sc, -1, path == "c")
            assert status == 0, f"the operation failed ({status})"
            _survivor_checks(store, sc, "completed")
            if kwargs.get("spill_dir"):
                assert store.stats()["spilled_bytes"] > 0, "nothing was spilled"
            steps = in_python + in_c
            if sc.all_in_c:  # the steady state: all in C, or all in Python
                assert (in_c > 0 and in_python == 0) if path == "c" else in_c == 0
            else:
                assert in_python > 0
        if sc.name == "create large" and path == "c":  # a new key: published in C
            assert in_c > 0
        kills = 0
        for at in range(1, steps + 1):
            _restore(store)
            if sc.before:
                sc.before(store)
            status, _, _ = _in_child(store, sc, at, path == "c")
            kills += status == -signal.SIGKILL
            _survivor_checks(store, sc, f"killed at step {at} of {steps}")
        # every step was a kill (the dead writer left by `before` varies a little)
        assert kills == steps if sc.before is None else kills > steps // 2


def _no_free_entry(store: SharedArrayStore) -> None:
    """_base, then fillers until every entry handed out is in use: a new key takes a fresh one."""
    _base(store)
    a = store._arena
    n = 0
    while a.h[ix.H_ENT_FREE] >= 0:
        store.put(f"z{n}", value(300 + n, 7, 8))
        n += 1
    assert a.h[ix.H_ENT_HW] < a.h[ix.H_ENT_BACKED], "no backed entry left to test with"


@pytest.mark.skipif(not _shm_fast.AVAILABLE, reason="the C fast path is not built")
def test_a_kill_at_every_step_of_a_publish_into_a_never_used_entry() -> None:
    # With no freed entry, C publishes a new key into the next entry never
    # handed out (past the high-water mark, memory behind it): a kill at
    # any step leaves the key absent and the mark as it was, or both new.
    sc = Scenario(
        "fresh entry", _no_free_entry, _create("c", 104, 1, N_SMALL), {"c": (104, {None, 1})}
    )

    def fresh() -> SharedArrayStore:
        store = SharedArrayStore(max_keys=24, max_blocks=1024, max_segs=64)
        sc.setup(store)
        return store

    with fresh() as store:
        hw = store._arena.h[ix.H_ENT_HW]
        status, in_python, in_c = _in_child(store, sc, -1, True)
        assert status == 0 and in_c > 0, (status, in_python, in_c)  # (Python: the child's row)
        assert store._arena.h[ix.H_ENT_HW] == hw + 1  # published in C, in a fresh entry
        _survivor_checks(store, sc, "completed")
    steps = in_python + in_c
    for at in range(1, steps + 1):
        with fresh() as store:
            hw = store._arena.h[ix.H_ENT_HW]
            status, _, _ = _in_child(store, sc, at, True)
            assert status == -signal.SIGKILL
            label = f"killed at step {at} of {steps}"
            _survivor_checks(store, sc, label)
            # (the checks' probe key took the next fresh entry, then freed it)
            assert store._arena.h[ix.H_ENT_HW] == hw + 1 + ("c" in store), label


def test_a_kill_while_rolling_back_leaves_the_work_to_the_next_holder() -> None:
    with SharedArrayStore(max_keys=24, max_blocks=1024, max_segs=64) as store:
        _base(store)
        sc = SCENARIOS[0]
        _, steps, _ = _in_child(store, sc, -1, False)
        _restore(store)
        # a writer dies half way through a put: the journal holds its section
        assert _in_child(store, sc, steps // 2, False)[0] == -signal.SIGKILL
        assert store._arena.h[ix.H_LOG_LEN] > 0
        recover = Scenario("recover", _base, lambda s: len(s), sc.allowed)
        # each next holder dies at another step of the rollback, until one finishes it
        for at in range(1, 2 * steps):
            status, _, _ = _in_child(store, recover, at, False)
            if status == 0:
                break
        assert store._arena.h[ix.H_LOG_LEN] == 0
        _survivor_checks(store, sc, "after the rollbacks")


def test_a_child_killed_while_it_adopts_inherited_views() -> None:
    # A process that forks while holding views keeps the store locked until
    # the child has pinned them in a row of its own (polystore._shm.fork).
    # The child dies at each step of that; the parent must undo its half-made
    # row and go on, its own view untouched.
    with SharedArrayStore(max_keys=24, max_blocks=1024, max_segs=64) as store:
        _base(store)
        view = store.get("t")
        steps = -1
        at = -1
        while True:
            r, w = os.pipe()
            faults.arm(at)  # inherited by the child; the parent takes no step meanwhile
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.write(w, struct.pack("q", faults.arm(0)))
                os._exit(0)
            faults.arm(0)
            os.close(w)
            status = _wait(pid)
            data = os.read(r, 8)
            os.close(r)
            if at == -1:
                steps = struct.unpack("q", data)[0]
                assert status == 0 and steps > 0
            else:
                assert status == -signal.SIGKILL
            found = problems(store._arena)
            assert not found, f"killed at step {at} of {steps}: {found}"
            assert version_of(store, "t", 100) == 1 and (view[1:] == 1).all()
            at = 1 if at == -1 else at + 1
            if at > steps:
                break
        del view
        store.put("t", value(100, 2, N_SMALL))
        _survivor_checks(store, SCENARIOS[0], "after the forks")


def test_a_garbled_journal_is_refused_not_replayed() -> None:
    # Only a bug or a stray writer could leave these; recovery must not act on them.
    with SharedArrayStore(max_keys=24, max_blocks=1024, max_segs=64) as store:
        _base(store)
        a = store._arena
        before = problems(a)
        q = a.q
        # records naming the journal itself, the seqlock and a word past the segment
        for j, index in enumerate((a.L0 + 1, ix.H_WSEQ, len(q) + 5)):
            q[a.L0 + 2 * j], q[a.L0 + 2 * j + 1] = index, 12345
        q[ix.H_LOG_LEN] = 3
        assert problems(a) == before  # recovered: nothing replayed
        q[ix.H_LOG_LEN] = ix.LOG_RECORDS + 10  # a count no section can reach
        assert problems(a) == before and a.h[ix.H_LOG_LEN] == 0
        _survivor_checks(store, SCENARIOS[0], "after a garbled journal")


def test_an_entry_freed_in_a_section_is_not_written_again_in_it() -> None:
    """fill_entry refuses a record freed in the same section: a rollback would restore its key
    to a record rewritten without a journal (the order write._prepare keeps)."""
    with SharedArrayStore() as store:
        store.put("a", np.zeros(3))
        _, kbz, h = store_key("a")
        with pytest.raises(RuntimeError, match="freed in this section"), store._arena.locked as a:
            i, e = a.find(kbz, h)
            a.remove(i, e)  # frees e
            fresh = a.new_entry()
            assert fresh == e
            a.fill_entry(fresh, b"b", (-1, 1, 0, b"<f8", (0,), 0))
        assert np.array_equal(store.get("a"), np.zeros(3))  # rolled back whole
        assert not problems(store._arena)
