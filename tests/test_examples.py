"""Every script in examples/ runs, small, in a fresh interpreter."""

from __future__ import annotations

import functools
import multiprocessing
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_pipeline_example(start_method: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "pipeline.py"),
            "--images",
            "12",
            "--side",
            "64",
            "--group",
            "4",
            "--compare-fraction",
            "1",
            "--start-method",
            start_method,
        ],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("polystore: 27 hand-offs")
    assert "projection max 8.000" in lines[-2]
    assert lines[-1].startswith("Manager().dict():") and "faster" in lines[-1]
    assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr


def test_pipeline_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "pipeline.py"), "--images", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--images" in proc.stderr


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["dask_pipeline.py", "pipeline.py"]


@pytest.mark.timeout(120)
def test_dask_pipeline_example() -> None:
    pytest.importorskip("distributed")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "dask_pipeline.py"), "--images", "12", "--side", "64",
         "--group", "4", "--no-progress"],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("polystore: 27 hand-offs") and "projection max 8.000" in lines[-2]
    assert lines[-1].startswith("plain Dask results:") and "polystore" in lines[-1]
    assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr


def test_dask_pipeline_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "dask_pipeline.py"), "--group", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--group" in proc.stderr


def _run_pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "pipeline.py"), "--no-progress", "--compare-fraction",
         "0", "--start-method", "fork", *args],
        capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_pipeline_in_bounded_shared_memory_waits_instead_of_failing() -> None:
    # 48 images of 4 MiB through 36 MB of shared memory: the pipeline keeps
    # few enough in flight, and stages wait for room as consumers free it
    proc = _run_pipeline("--images", "48", "--side", "1024", "--group", "2", "--max-bytes", "36")
    assert proc.returncode == 0, proc.stderr
    assert "projection max 8.000" in proc.stdout and "capped at 36 MB" in proc.stdout


@pytest.mark.timeout(180)
def test_pipeline_spills_what_does_not_fit(tmp_path: Path) -> None:
    # each 16 MiB image is larger than the 8 MB of shared memory: all spill
    proc = _run_pipeline(
        "--images", "6", "--side", "2048", "--group", "3", "--max-bytes", "8",
        "--spill-dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "projection max 8.000" in proc.stdout and "spilled to" in proc.stdout
    assert os.listdir(tmp_path) == []  # removed with the store


def test_pipeline_refuses_a_cap_it_cannot_work_in() -> None:
    proc = _run_pipeline("--images", "4", "--side", "1024", "--group", "8", "--max-bytes", "8")
    assert proc.returncode == 2 and "--spill-dir" in proc.stderr


# -- the example's pool --------------------------------------------------------
def _stage_pool() -> Any:
    return runpy.run_path(str(EXAMPLES / "pipeline.py"), run_name="pipeline_example")["StagePool"]


@pytest.mark.timeout(60)
def test_stage_pool_runs_tasks_and_raises_what_a_task_raised() -> None:
    pool_type, fork = _stage_pool(), multiprocessing.get_context("fork")
    with pool_type(2, fork) as pool:
        tokens = {pool.submit(abs, -i): i for i in range(10)}
        assert sorted((tokens[t], v) for t, v in (pool.next_result() for _ in tokens)) == [
            (i, i) for i in range(10)
        ]
        pool.submit(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            pool.next_result()
        pool.submit(abs, -3)
        assert pool.next_result()[1] == 3  # the worker that raised still serves
        pool.submit(memoryview, b"x")  # a memoryview does not pickle
        with pytest.raises(RuntimeError, match="could not be sent back"):
            pool.next_result()
        pool.submit(abs, -4)
        assert pool.next_result()[1] == 4
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
def test_stage_pool_reports_a_dead_worker_instead_of_waiting() -> None:
    pool_type, fork = _stage_pool(), multiprocessing.get_context("fork")
    with pool_type(2, fork) as pool:
        pool.submit(os._exit, 3)
        with pytest.raises(RuntimeError, match="ended"):
            pool.next_result()
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
def test_stage_pool_raises_what_its_initializer_raised() -> None:
    pool_type, fork = _stage_pool(), multiprocessing.get_context("fork")
    with pytest.raises(ValueError, match="bad start"):
        pool_type(2, fork, functools.partial(int, "bad start"))
    assert multiprocessing.active_children() == []


def test_pipeline_says_how_to_run_where_shared_memory_is_small(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a container's 64 MB /dev/shm: the default sizes would stop with
    # ShmFullError partway; the example says what to do instead, at once
    example = runpy.run_path(str(EXAMPLES / "pipeline.py"), run_name="pipeline_example")
    real = os.statvfs

    def small(path: Any) -> Any:
        found = real(path)
        return os.statvfs_result((*found[:4], 64 * 2**20 // found.f_frsize, *found[5:]))

    monkeypatch.setattr(os, "statvfs", small)
    with pytest.raises(SystemExit) as stop:
        example["main"](["--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "64 MB free" in err and "--max-bytes" in err and "--shm-size" in err


def test_dask_pipeline_says_what_to_do_when_shared_memory_runs_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from polystore import ShmFullError

    main = runpy.run_path(str(EXAMPLES / "dask_pipeline.py"), run_name="dask_example")["main"]

    def full(args: Any) -> Any:
        raise ShmFullError(4 << 20, 2 << 20, "/dev/shm")

    main.__globals__["_both"] = full  # as a task on a worker would meet it
    assert main(["--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not enough shared memory in /dev/shm" in err and "--shm-size" in err
