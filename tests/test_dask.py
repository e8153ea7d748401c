"""polystore.dask on a real LocalCluster of two worker processes on 127.0.0.1.

One cluster and one client serve the whole module; each test gets the client
through a fixture that removes the client's store when the test ends, before
the suite's leak check looks at ``/dev/shm``.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from polystore import NotShareableError, StorageError
from polystore.exceptions import SharedValueReleasedError

distributed = pytest.importorskip("distributed")
import polystore.dask as psd  # noqa: E402  (after the skip: only worth importing with distributed)

pytestmark = pytest.mark.timeout(60)


# -- tasks (module level, so workers import them) ------------------------------------


def backing_file(view: np.ndarray[Any, Any]) -> str:
    """The file mapped at the view's first byte, from this process's memory map."""
    address = view.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


def read(handle: psd.SharedArray) -> tuple[int, float, bool, str]:
    view = handle.get()
    return os.getpid(), float(view.sum()), view.flags.writeable, backing_file(view)


def read_elsewhere(handle: psd.SharedArray) -> float:
    return float(handle.get().sum())


@psd.shared_result
def ramp(n: int) -> np.ndarray[Any, Any]:
    return np.arange(n, dtype=np.float64)


@psd.shared_result
def not_an_array(n: int) -> list[int]:
    return list(range(n))


def doubled_in_place(handle: psd.SharedArray) -> psd.SharedArray:
    source = handle.get()
    with psd.result_array(source.shape, source.dtype) as out:
        np.multiply(source, 2, out=out.array)
    return out.handle


def fails_in_place(n: int) -> psd.SharedArray:
    with psd.result_array(n, "f8") as out:
        out.array[:] = 1
        raise RuntimeError("boom")
    return out.handle  # pragma: no cover


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # any free port: clusters run side by side
            worker_dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def client(cluster_client: Any) -> Iterator[Any]:
    psd.install(cluster_client)
    yield cluster_client
    psd.close(cluster_client)


def workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def mine() -> set[str]:
    prefix = f"polystore-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def wait_for(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    # Dask forgets keys asynchronously; poll for the outcome instead of sleeping.
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {limit:g} s for {what}")
        time.sleep(0.02)


def store_keys(client: Any) -> list[str]:
    return psd._owned[client.id].keys()


# -- tests -----------------------------------------------------------------------------


def test_broadcast_maps_one_copy_in_every_worker(client: Any) -> None:
    array = np.arange(100_000, dtype=np.float64).reshape(250, 400)
    handle = psd.share(client, array)
    assert pickle.loads(pickle.dumps(handle)).key == handle.key
    assert len(pickle.dumps(handle)) < 400  # a description, never the data
    results = [
        client.submit(read, handle, workers=[address], pure=False).result()
        for address in workers(client)
    ]
    pids = {pid for pid, _, _, _ in results}
    files = {path for _, _, _, path in results}
    assert len(pids) == 2
    assert {total for _, total, _, _ in results} == {float(array.sum())}
    assert not any(writeable for _, _, writeable, _ in results)
    # Both workers read the same shared-memory file, which the client owns.
    assert len(files) == 1
    assert os.path.basename(files.pop()).startswith(f"polystore-{os.getpid()}-")
    np.testing.assert_array_equal(handle.get(), array)


def read_when_told(handle: psd.SharedArray, event_name: str) -> float:
    distributed.Event(event_name).wait(30)
    return float(handle.get().sum())


def test_the_memory_manager_leaves_a_handle_with_its_owner(client: Any) -> None:
    """Dask's active memory manager drops the extra replicas of a key, every 2 s by
    default, and never on a worker where a task waiting for the key runs: here the
    one that made the value, whose handle owns it. Installing keeps handles out of it."""
    first, second = workers(client)
    produced = client.submit(ramp, 1_000, workers=[first], pure=False)
    event = f"go-{os.getpid()}-{time.monotonic_ns()}"
    consumed = client.submit(read_when_told, produced, event, workers=[second], pure=False)
    wait_for(lambda: len(client.who_has(produced).get(produced.key, ())) == 2, "the copy")
    client.amm.run_once()  # (without install(): drops the first worker's, the owner's)
    time.sleep(0.5)
    distributed.Event(event).set()
    assert consumed.result(timeout=30) == float(np.arange(1_000).sum())


def policies(dask_scheduler: Any) -> list[str]:
    return sorted(type(p).__name__ for p in dask_scheduler.extensions["amm"].policies)


def test_other_keys_still_lose_their_extra_replicas(client: Any) -> None:
    assert client.run_on_scheduler(policies) == ["KeepHandleReplicas"]
    plain = client.submit(np.arange, 1_000, workers=[workers(client)[0]], pure=False)
    # The manager's own runs (every 2 s) could drop the replica before it is
    # seen: only the run below may.
    was_running = client.amm.running()
    client.amm.stop()
    try:
        client.replicate([plain])
        wait_for(lambda: len(client.who_has(plain).get(plain.key, ())) == 2, "the replica")
        client.amm.run_once()
        wait_for(lambda: len(client.who_has(plain).get(plain.key, ())) == 1, "one dropped")
    finally:
        if was_running:
            client.amm.start()


def test_hand_off_between_workers_and_freed_when_dask_forgets(client: Any) -> None:
    first, second = workers(client)
    produced = client.submit(ramp, 50_000, workers=[first], pure=False)
    consumed = client.submit(read, produced, workers=[second], pure=False)
    _, total, writeable, path = consumed.result()
    assert total == float(np.arange(50_000).sum()) and not writeable
    assert os.path.basename(path).startswith(f"polystore-{os.getpid()}-")
    key = produced.result().key
    assert key in store_keys(client)

    # A copy (here the client's) never deletes: the value lives while Dask holds the key.
    copy = produced.result()
    view = copy.get()
    del copy
    gc.collect()
    assert key in store_keys(client)

    del produced, consumed
    wait_for(lambda: key not in store_keys(client), "the worker to drop the result")
    assert view.sum() == total  # a view taken before stays valid


def test_a_task_computes_its_result_in_shared_memory(client: Any) -> None:
    first, second = workers(client)
    produced = client.submit(ramp, 10_000, workers=[first], pure=False)
    doubled = client.submit(doubled_in_place, produced, workers=[second], pure=False)
    _, total, writeable, path = client.submit(read, doubled, workers=[first], pure=False).result()
    assert total == 2 * float(np.arange(10_000).sum()) and not writeable
    assert os.path.basename(path).startswith(f"polystore-{os.getpid()}-")
    key = doubled.result().key
    assert key in store_keys(client)
    before = set(store_keys(client))
    with pytest.raises(RuntimeError, match="boom"):
        client.submit(fails_in_place, 1000, workers=[first], pure=False).result()
    assert set(store_keys(client)) <= before  # nothing published by the failed task
    del produced, doubled
    wait_for(lambda: key not in store_keys(client), "the worker to drop the result")


def test_shared_result_refuses_what_is_not_an_array(client: Any) -> None:
    with pytest.raises(TypeError, match=r"not_an_array\(\) returned list"):
        client.submit(not_an_array, 3, pure=False).result()
    with pytest.raises(TypeError, match="list"):
        psd.share(client, [1, 2, 3])


def test_release(client: Any) -> None:
    array = np.ones((64, 64), dtype=np.int32)
    handle = psd.share(client, array)
    view = handle.get()
    psd.release(handle)
    assert int(view.sum()) == 64 * 64  # views taken before stay valid
    with pytest.raises(SharedValueReleasedError, match=handle.key) as info:
        handle.get()
    assert isinstance(info.value, KeyError) and isinstance(info.value, StorageError)
    with pytest.raises(SharedValueReleasedError, match=handle.key):
        client.submit(read, handle, pure=False).result()
    with pytest.raises(KeyError):
        handle.release()


def test_other_node_refuses_and_names_both(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = psd.share(client, np.zeros(8))
    faraway = psd.SharedArray(
        "elsewhere/boot", handle.store, handle.directory, handle.key, (8,), "<f8"
    )
    with pytest.raises(NotShareableError, match="elsewhere/boot") as info:
        client.submit(read_elsewhere, faraway, pure=False).result()
    assert handle.node in str(info.value)  # the worker's node, which is this one

    monkeypatch.setenv("POLYSTORE_NODE_ID", "another-host")
    with pytest.raises(NotShareableError, match="another-host"):
        handle.get(fetch=False)  # shared memory only
    # by default the bytes come from a worker of the array's node, through Dask
    fetched = handle.get()
    assert fetched.sum() == 0 and fetched.shape == (8,) and not fetched.flags.writeable
    assert "polystore-" not in backing_file(fetched)  # a copy, not a view of shared memory
    monkeypatch.delenv("POLYSTORE_NODE_ID")
    assert handle.get().sum() == 0


def on_another_node(handle: psd.SharedArray) -> tuple[str, float, str]:
    os.environ["POLYSTORE_NODE_ID"] = "another-host"
    try:
        got = handle.get()  # fetched from the worker of the real node
        return psd.node_id(), float(got.sum()), backing_file(got)
    finally:
        del os.environ["POLYSTORE_NODE_ID"]


def test_a_task_on_another_node_gets_a_copy_through_dask(client: Any) -> None:
    handle = psd.share(client, np.arange(1000, dtype=np.float64))
    first, _ = workers(client)
    node, total, path = client.submit(on_another_node, handle, workers=[first], pure=False).result()
    assert node == "another-host" and total == float(np.arange(1000).sum())
    assert not os.path.basename(path).startswith("polystore-")  # not mapped: a copy


def test_nothing_left_after_the_client_closes(cluster_client: Any) -> None:
    before = mine()
    with distributed.Client(cluster_client.cluster) as other:
        handle = psd.share(other, np.arange(1 << 20, dtype=np.uint8))
        assert other.submit(read, handle, pure=False).result()[1] > 0
        assert mine() - before
    assert mine() - before == set()
    with pytest.raises(SharedValueReleasedError, match=handle.key):
        handle.get()


def pretend_another_node(n: int) -> psd.SharedArray:
    os.environ["POLYSTORE_NODE_ID"] = "another-host"
    try:
        return ramp(n)
    finally:
        del os.environ["POLYSTORE_NODE_ID"]


def test_a_worker_of_another_node_cannot_put_results_here(client: Any) -> None:
    with pytest.raises(NotShareableError, match="another-host"):
        client.submit(pretend_another_node, 4, pure=False).result()


@pytest.mark.allow_leaks("the nanny restarts the killed worker: a new child that outlives the test")
def test_a_killed_workers_results_are_reclaimed(client: Any) -> None:
    first, _ = workers(client)
    produced = client.submit(ramp, 10_000, workers=[first], pure=False)
    key = produced.result().key
    pid = int(key.split("-")[1][1:])  # "dask-r<pid>-<uuid>"
    assert pid == client.run(os.getpid, workers=[first])[first]
    os.kill(pid, signal.SIGKILL)
    # The nanny starts a new worker, which reclaims what the dead one left.
    wait_for(lambda: key not in store_keys(client), "the dead worker's result to be reclaimed")
    del produced
    client.wait_for_workers(2, timeout=30)
    before = mine()
    psd.close(client)
    assert before and mine() == set()  # the owner removes the whole store


def test_install_on_dask_is_still_reachable() -> None:
    import polystore
    import polystore.pools

    assert polystore.install_on_dask is psd.install_on_dask
    assert callable(polystore.pools.install_on_dask)
