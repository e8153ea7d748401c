"""Per-worker FileManagers over one shared registry, under every start method."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import polystore
from polystore import (
    BackendNotFoundError,
    BackendRegistry,
    FileManager,
    FileManagerFactory,
    MemoryBackend,
    NotShareableError,
    StorageError,
)
from polystore.pools import uninstall
from polystore.testing import assert_same_value

pytestmark = pytest.mark.timeout(120)


# -- stage functions, module level so that spawn can import them -----------------
def produce(index: int) -> tuple[int, int, str]:
    fm = polystore.current_filemanager()
    path = f"stage1/{index}.npy"
    fm.save(np.full((64, 64), index, dtype=np.float32), path, backend="memory")
    fm.save(np.arange(index + 1), f"stage1/{index}.npy", backend="shm")
    return os.getpid(), id(fm), path


def consume(path: str) -> tuple[int, int, str]:
    fm = polystore.current_filemanager()
    image = fm.load(path, backend="memory")
    out = path.replace("stage1", "stage2")
    fm.save(image * 2, out, backend="memory")
    return os.getpid(), id(fm), out


def fail_missing(path: str) -> None:
    polystore.current_filemanager().load(path, backend="memory")


def fail_backend(name: str) -> None:
    polystore.current_filemanager().load("x.npy", backend=name)


def with_factory(factory: FileManagerFactory, index: int) -> tuple[int, int, str]:
    fm = factory()
    path = f"joblib/{index}.npy"
    fm.save(np.full(8, index), path, backend="memory")
    return os.getpid(), id(fm), path


def mapped_segments(_: int) -> tuple[int, int]:
    """Segments of the ``memory`` store this worker has mapped for reading and for writing."""
    store = polystore.current_filemanager().registry["memory"].array_store
    arena = store._arena
    return len(arena.ro_maps), len(arena.rw_maps)


@pytest.fixture
def factory() -> Iterator[FileManagerFactory]:
    with polystore.shared_registry() as registry:
        yield FileManagerFactory(registry)
    uninstall()


def test_two_stage_pipeline(
    factory: FileManagerFactory, mp_context: multiprocessing.context.BaseContext
) -> None:
    with ProcessPoolExecutor(2, mp_context=mp_context, initializer=factory.initializer) as pool:
        first = list(pool.map(produce, range(8)))
        second = list(pool.map(consume, [path for _, _, path in first]))
    fm = factory()
    for index, (_, _, path) in enumerate(second):
        assert_same_value(fm.load(path, backend="memory"), np.full((64, 64), 2 * index, np.float32))
    assert fm.list_files("stage2", backend="memory") == sorted(p for _, _, p in second)
    assert len(fm.list_files("stage1", backend="shm")) == 8
    managers: dict[int, set[int]] = {}
    for pid, fm_id, _ in first + second:
        managers.setdefault(pid, set()).add(fm_id)
    assert os.getpid() not in managers
    assert all(len(ids) == 1 for ids in managers.values()), managers


def test_worker_errors_arrive_intact(factory: FileManagerFactory) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=factory.initializer) as pool:
        with pytest.raises(FileNotFoundError) as missing:
            pool.submit(fail_missing, "nowhere/x.npy").result()
        with pytest.raises(BackendNotFoundError) as unknown:
            pool.submit(fail_backend, "dsik").result()
    assert missing.value.filename == "nowhere/x.npy"
    assert unknown.value.name == "dsik" and "disk" in unknown.value.available


def test_multiprocessing_pool(factory: FileManagerFactory) -> None:
    with multiprocessing.get_context("forkserver").Pool(2, initializer=factory.initializer) as pool:
        paths = [path for _, _, path in pool.map(produce, range(4))]
    assert len(factory().load_batch(paths, backend="memory")) == 4


def test_joblib_loky(factory: FileManagerFactory) -> None:
    joblib = pytest.importorskip("joblib")
    with joblib.parallel_config(backend="loky", n_jobs=2):
        results = joblib.Parallel(batch_size=1)(
            joblib.delayed(with_factory)(factory, i) for i in range(40)
        )
    paths = [path for _, _, path in results]
    assert factory().list_files("joblib", backend="memory") == sorted(paths)
    managers: dict[int, set[int]] = {}
    for pid, fm_id, _ in results:
        managers.setdefault(pid, set()).add(fm_id)
    assert all(len(ids) == 1 for ids in managers.values()), managers
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)


def test_pickled_factory_is_small(factory: FileManagerFactory) -> None:
    fm = factory()
    fm.save(np.zeros((1024, 1024)), "big.npy", backend="memory")
    assert factory.pickled_size < 4096
    clone = pickle.loads(pickle.dumps(factory))
    assert clone is factory, "unpickling in the same process reuses the factory"


def test_premap_maps_the_shared_memory_in_each_worker() -> None:
    context = multiprocessing.get_context("spawn")
    with polystore.shared_registry() as registry:
        store = registry["memory"].array_store
        store.reserve(4 << 20, 1 << 20)
        segments = store.stats()["segments"]
        assert segments >= 1
        plain, premapped = FileManagerFactory(registry), FileManagerFactory(registry, premap=True)
        assert pickle.loads(pickle.dumps(premapped)).premap and not plain.premap
        assert premapped.pickled_size < 4096
        for factory, expected in ((plain, (0, 0)), (premapped, (segments, segments))):
            with ProcessPoolExecutor(
                1, mp_context=context, initializer=factory.initializer
            ) as pool:
                assert pool.submit(mapped_segments, 0).result() == expected
        assert premapped.map_shared_memory() == store.stats()["mapped_bytes"]
    uninstall()


def test_one_filemanager_per_thread(factory: FileManagerFactory) -> None:
    seen: list[FileManager] = []
    threads = [
        threading.Thread(target=lambda: seen.extend([factory(), factory()])) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] is seen[1] and seen[2] is seen[3]
    assert seen[0] is not seen[2]
    assert factory() is factory() and factory() not in seen


def _report_fresh(factory: FileManagerFactory, queue: multiprocessing.Queue[bool]) -> None:
    queue.put(getattr(factory._local, "fm", None) is None)


def test_fork_resets_cached_managers(factory: FileManagerFactory) -> None:
    factory()
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bool] = context.Queue()
    proc = context.Process(target=_report_fresh, args=(factory, queue))
    proc.start()
    assert queue.get(timeout=30) is True
    proc.join(30)
    queue.close()
    queue.join_thread()


def test_unshareable_registry_is_refused() -> None:
    with pytest.raises(NotShareableError, match="'memory'"):
        FileManagerFactory({"memory": MemoryBackend()})
    registry = BackendRegistry()
    registry["memory"]
    with pytest.raises(NotShareableError, match="'memory'"):
        FileManagerFactory(registry)
    with pytest.raises(TypeError):
        FileManagerFactory(None)  # type: ignore[arg-type]


def test_default_private_backend_fails_clearly_in_worker() -> None:
    factory = FileManagerFactory(BackendRegistry())
    clone = pickle.loads(factory._payload)
    with pytest.raises(NotShareableError, match="shared_registry"):
        clone["memory"].save(np.ones(1), "x.npy")


def test_current_filemanager_needs_a_factory() -> None:
    uninstall()
    with pytest.raises(StorageError, match="initializer"):
        polystore.current_filemanager()


def test_shared_registry_releases_everything() -> None:
    with polystore.shared_registry() as registry:
        registry["memory"].save(np.ones(10), "a.npy")
        store_names = [registry[n].array_store.name for n in ("memory", "shm")]  # type: ignore[attr-defined]
    leftovers = [n for n in os.listdir("/dev/shm") if any(s in n for s in store_names)]
    assert leftovers == []


# -- Dask distributed ------------------------------------------------------------
def dask_task(index: int, root: str) -> str:
    fm = polystore.current_filemanager()
    path = f"{root}/dask/{index}.npy"
    fm.save(np.full(4, index), path, backend="disk")
    return path


def dask_shm_task() -> str:
    polystore.current_filemanager().save(np.ones(1), "x.npy", backend="shm")
    return "saved"


@pytest.mark.timeout(180)
def test_dask_local_cluster(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with polystore.shared_registry() as registry:
        factory = FileManagerFactory(registry)
        with (
            distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",  # any free port: clusters run side by side
                worker_dashboard_address=None,
                env={"POLYSTORE_NODE_ID": "another-machine"},
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            polystore.install_on_dask(client, factory)
            futures = client.map(dask_task, range(4), root=str(tmp_path))
            paths = client.gather(futures)
            with pytest.raises(NotShareableError, match="node"):
                client.submit(dask_shm_task, pure=False).result()
        fm = factory()
        for index, path in enumerate(paths):
            assert_same_value(fm.load(path, backend="disk"), np.full(4, index))


def save_in_memory(index: int) -> str:
    path = f"private/{index}.npy"
    polystore.current_filemanager().save(np.full(4, index), path, backend="memory")
    return path


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_private_registry_fails_alike_under_every_start_method(method: str) -> None:
    # A plain BackendRegistry's memory backend lives in one process: a worker
    # must refuse it, not write into an inherited copy the parent never sees.
    factory = FileManagerFactory(BackendRegistry())
    context = multiprocessing.get_context(method)
    try:
        with ProcessPoolExecutor(1, mp_context=context, initializer=factory.initializer) as pool:
            with pytest.raises(NotShareableError, match="shared_registry"):
                pool.submit(save_in_memory, 0).result(timeout=60)
            assert pool.submit(os.getpid).result(timeout=60) != os.getpid()  # the pool still works
    finally:
        uninstall()


def test_shared_registry_round_trip_under_fork(factory: FileManagerFactory) -> None:
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(2, mp_context=context, initializer=factory.initializer) as pool:
        paths = list(pool.map(save_in_memory, range(4)))
    fm = factory()
    for index, path in enumerate(paths):
        np.testing.assert_array_equal(fm.load(path, backend="memory"), np.full(4, index))
