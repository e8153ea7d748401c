"""A randomized soak: writer processes SIGKILLed at random moments, a reader checking every value.

Writers put or create in place (small, large and mixed sizes, some through
the C fast path and some through Python), delete random keys, and change
pairs of keys together (``update``: a value and its "metadata"; the shm
backends' removal of a file with its metadata) until the
test kills them, after a random delay, and starts another. After each kill
every pair must still be a pair: its metadata absent or of its value's
version, never without its value. A reader process meanwhile reads every
key over and over and checks each value it gets: values are self-describing
(element 0 names the key, every other element is the version), so a torn or
foreign value is seen at once. At the end the store must pass its full
consistency check, keys no writer touches must be intact, and nothing may
leak (the suite's leak check runs after every test).

``--soak-seconds`` sets the length (a few seconds by default, for CI).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from typing import Any

import numpy as np
import pytest

from polystore import SharedArrayStore
from polystore._shm.check import problems

pytestmark = pytest.mark.timeout(900)

KEYS = [f"k{i}" for i in range(12)]
STABLE = [f"stable{i}" for i in range(4)]
PAIRS = [(f"p{i}", f"p{i}.meta") for i in range(4)]  # changed only together
SIZES = [16, 1000, 20_000, 200_000, 600_000]  # int64 elements: 128 B to 4.8 MB


def _value(kid: int, version: int, n: int) -> np.ndarray:
    arr = np.full(n, version, np.int64)
    arr[0] = kid
    return arr


def _check(arr: Any, kid: int) -> str | None:
    flat = np.asarray(arr).ravel()
    if flat[0] != kid:
        return f"key id {kid} holds the value of key id {flat[0]}"
    if not (flat[1:] == flat[1]).all():
        return f"key id {kid} is torn: versions {np.unique(flat[1:])[:4]}"
    return None


def _writer(name: str, seed: int, use_c: bool) -> None:  # pragma: no cover - killed
    store = SharedArrayStore.attach(name)
    if not use_c:
        store._arena.fast = None
    rng = random.Random(seed)
    sizes = rng.choice([SIZES[:2], SIZES[2:], SIZES])  # small, large or mixed puts
    version = seed << 20
    while True:
        version += 1
        kid = rng.randrange(len(KEYS))
        roll = rng.random()
        if roll < 0.2:
            try:
                store.delete(KEYS[kid])
            except KeyError:
                pass
        elif roll < 0.35:  # a pair: both new, the value new and no metadata, or neither
            key, meta = PAIRS[kid % len(PAIRS)]
            n = rng.choice(sizes)
            if roll < 0.27:  # (new shapes for both: entry records freed and taken in one step)
                tag = _value(kid, version, rng.choice((8, 16)))
                store.update({key: _value(kid, version, n), meta: tag})
            elif roll < 0.32:
                store.update({key: _value(kid, version, n)}, remove=[meta])
            elif roll < 0.335:
                store.update(remove=[key, meta])
            else:  # a file's delete on the shm backends: the value, and its metadata with it
                store._remove_with(key, meta)
        elif roll < 0.55:  # made in place: taken, filled, published (C or Python)
            with store.create(KEYS[kid], rng.choice(sizes), np.int64) as out:
                out.fill(version)
                out[0] = kid
        else:
            store.put(KEYS[kid], _value(kid, version, rng.choice(sizes)))


def _pair_problems(store: SharedArrayStore) -> list[str]:
    """What is wrong with the pairs: metadata without its value, or of another version."""
    found = []
    for key, meta in PAIRS:
        value = store.get(key) if key in store else None
        tag = store.get(meta) if meta in store else None
        for got in (value, tag):
            if got is not None and _check(got, int(got[0])):
                found.append(f"{key}: {_check(got, int(got[0]))}")
        if tag is None:
            continue
        if value is None:
            found.append(f"{meta} without {key}")
        elif value[1] != tag[1]:
            found.append(f"{key} holds version {value[1]}, {meta} version {tag[1]}")
    return found


def _reader(name: str, stop: Any, report: Any) -> None:  # pragma: no cover - child
    store = SharedArrayStore.attach(name)
    reads, errors = 0, []
    while not stop.is_set():
        for kid, key in enumerate(KEYS):
            try:
                view = store.get(key)
            except KeyError:
                continue
            problem = _check(view, kid)
            del view
            reads += 1
            if problem:
                errors.append(problem)
    report.put((reads, errors[:10]))
    store.close()


def test_writers_killed_at_random_never_show_a_reader_a_bad_value(
    request: pytest.FixtureRequest,
) -> None:
    seconds = float(request.config.getoption("--soak-seconds"))
    ctx = mp.get_context("fork")
    rng = random.Random(1234)
    with SharedArrayStore(max_keys=64, max_blocks=4096, max_procs=64, cache_bytes=8 << 20) as store:
        for i, key in enumerate(STABLE):
            store.put(key, _value(100 + i, 7, SIZES[i]))
        stop, report = ctx.Event(), ctx.Queue()
        reader = ctx.Process(target=_reader, args=(store.name, stop, report))
        reader.start()
        kills = 0
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                seed = rng.randrange(1, 1 << 20)
                writer = ctx.Process(target=_writer, args=(store.name, seed, seed % 2 == 0))
                writer.start()
                time.sleep(rng.uniform(0.002, 0.04))
                assert writer.pid is not None
                os.kill(writer.pid, signal.SIGKILL)
                writer.join(10)
                assert writer.exitcode == -signal.SIGKILL, "a writer failed before it was killed"
                kills += 1
                broken = _pair_problems(store)  # (the first read repairs what it left)
                assert not broken, f"after kill {kills}: {broken}"
        finally:
            stop.set()
            reads, errors = report.get(timeout=60)
            reader.join(30)
        assert reader.exitcode == 0
        assert not errors, errors
        assert kills >= 20 and reads > 0
        found = problems(store._arena)
        assert not found, found
        for i, key in enumerate(STABLE):
            assert _check(store.get(key), 100 + i) is None
            assert store.get(key)[1] == 7
        for kid, key in enumerate(KEYS):  # whatever the writers left is whole
            if key in store:
                assert _check(store.get(key), kid) is None
        # the store still works, and the dead writers' rows are reclaimed
        store.put("probe", np.arange(3))
        store.put("probe-large", np.zeros(1 << 20))
        assert store.stats()["processes"] <= 2
        print(f"soak: {kills} writers killed, {reads} values read and checked")
