"""MemoryBackend over a Manager().dict(): the spec's example, across processes."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import pytest
from storms import run_storm
from test_memory import RawMapping

from polystore import FileManager, MemoryBackend
from polystore._managed import Resyncing
from polystore.testing import BackendTests, assert_same_value

pytestmark = pytest.mark.timeout(120)


def _save_from_worker(fm: FileManager, index: int) -> str:
    path = f"results/{index}.npy"
    fm.save(np.full((256, 256), index, dtype=np.float32), path, backend="memory")
    fm.save({"index": index}, f"results/{index}.json", backend="memory")
    return path


@pytest.fixture(scope="module")
def manager() -> Iterator[Any]:
    with multiprocessing.get_context("spawn").Manager() as m:
        yield m


class TestManagerDictBackend(RawMapping, BackendTests):
    """The conformance suite on the spec's shared dict (small arrays stay in the dict)."""

    @pytest.fixture
    def backend(self, manager: Any) -> Iterator[MemoryBackend]:
        with MemoryBackend(shared_dict=manager.dict(), store=None) as backend:
            yield backend


def test_spec_example_under_each_start_method(
    manager: Any, mp_context: multiprocessing.context.BaseContext
) -> None:
    shared_dict = manager.dict()
    backend = MemoryBackend(shared_dict=shared_dict)
    try:
        registry = {"memory": backend}
        fm = FileManager(registry)
        with mp_context.Pool(2) as pool:
            paths = pool.starmap(_save_from_worker, [(fm, i) for i in range(4)])
        for i, path in enumerate(paths):
            assert_same_value(fm.load(path, backend="memory"), np.full((256, 256), i, np.float32))
            assert fm.load(f"results/{i}.json", backend="memory") == {"index": i}
        assert len(fm.list_files("results", backend="memory", extensions={".npy"})) == 4
    finally:
        backend.close()


def test_large_arrays_bypass_the_manager(manager: Any) -> None:
    shared_dict = manager.dict()
    with MemoryBackend(shared_dict=shared_dict) as backend:
        big = np.ones((512, 512), dtype=np.float32)  # 1 MB: above the threshold
        backend.save(big, "big.npy")
        small = np.ones(4)
        backend.save(small, "small.npy")
        raw = shared_dict["/big.npy"]
        assert len(pickle.dumps(raw)) < 200, "only a descriptor travels through the Manager"
        assert isinstance(shared_dict["/small.npy"], np.ndarray)
        assert_same_value(backend.load("big.npy"), big)


class CountingDict(MutableMapping[str, Any]):
    """A dict that counts how often stored values are read."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.value_reads = 0

    def __getitem__(self, key: str) -> Any:
        self.value_reads += 1
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def keys(self) -> Any:
        return self.data.keys()


def test_queries_never_read_stored_values() -> None:
    counting = CountingDict()
    backend = MemoryBackend(shared_dict=counting, store=None)
    for i in range(8):
        backend.save(np.zeros(16), f"d/{i}.npy")
    counting.value_reads = 0
    backend.list_files("d")
    backend.list_files("/", recursive=True, pattern="*.npy")
    backend.list_dir("d")
    backend.exists("d/1.npy")
    backend.is_file("d/1.npy")
    backend.is_dir("d")
    assert counting.value_reads == 0


class _CutAfterSend:
    """A proxy's connection whose exchange is cut after the request went out (Ctrl-C in recv)."""

    def __init__(self, conn: Any, exc: BaseException) -> None:
        self.conn, self.exc = conn, exc

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def recv(self) -> Any:
        raise self.exc

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("from a signal handler")])
def test_an_interrupted_manager_call_leaves_the_mapping_in_step(
    manager: Any, exc: BaseException
) -> None:
    proxy = manager.dict({"a": 1, "b": 2})
    mapping = Resyncing(proxy)
    assert mapping["a"] == 1
    conn = proxy._tls.connection
    with pytest.raises(KeyError):
        mapping["missing"]  # the manager's own answer: the connection is kept
    assert proxy._tls.connection is conn
    proxy._tls.connection = _CutAfterSend(conn, exc)
    with pytest.raises(type(exc)):
        mapping["a"]  # its answer is left unread on that connection
    # through the bare proxy, the next call would read "a"'s answer as its own
    assert mapping["b"] == 2
    assert proxy._tls.connection is not conn


STORM = r"""
import signal, sys, time
import multiprocessing
import numpy as np
from polystore import MemoryBackend

class Interrupted(Exception):
    pass

armed, count = False, 0

def handler(signum, frame):
    global count
    if armed:
        count += 1
        raise KeyboardInterrupt if count % 2 else Interrupted

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Manager() as manager:
        backend = MemoryBackend(shared_dict=manager.dict(), store=None)
        backend.save(np.zeros(10), "a.npy")
        backend.save(np.ones(10), "b.npy")
        signal.signal(signal.SIGALRM, handler)
        interrupts = wrong = 0
        skip = False
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        start = time.monotonic()
        while time.monotonic() - start < float(sys.argv[1]):
            try:
                armed, skip = not skip, False
                a, b = backend.load("a.npy"), backend.load("b.npy")
                armed = False
                wrong += not ((a == 0).all() and (b == 1).all())
            except (KeyboardInterrupt, Interrupted):
                armed, skip = False, True
                interrupts += 1
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        print(interrupts, wrong)
"""


def test_a_manager_dict_under_a_storm_of_interrupts_reads_right_and_never_hangs(
    tmp_path: Any, storm_seconds: str
) -> None:
    script = tmp_path / "storm.py"  # (spawn imports the main module from a file)
    script.write_text(STORM)
    interrupts, wrong = map(int, run_storm(script, storm_seconds))
    assert interrupts > 50 and wrong == 0
