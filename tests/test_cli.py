"""``python -m polystore``: version, info, closed pipes, and messages that say why."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import __main__ as cli
from polystore._shm import fast
from polystore._version import __version__
from polystore.shmstore import SharedArrayStore

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "polystore", *args],
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        cwd=REPO,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SharedArrayStore]:
    with SharedArrayStore(f"cli_{uuid.uuid4().hex[:8]}", directory=tmp_path) as live:
        live.put("x", np.ones(4))
        yield live


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"polystore {__version__}"


def test_info_says_whether_the_fast_path_is_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"polystore {__version__}" in out
    expected = "active" if fast.ENABLED else ("turned off" if fast.AVAILABLE else "not built")
    assert f"C fast path of the shared-memory store: {expected}" in out


@pytest.mark.skipif(not fast.AVAILABLE, reason="the C fast path is not built")
def test_info_when_the_fast_path_is_turned_off() -> None:
    result = run_cli("info", env={"POLYSTORE_NO_FASTPATH": "1"}, capture_output=True, text=True)
    assert "turned off by POLYSTORE_NO_FASTPATH" in result.stdout


def test_a_closed_pipe_prints_no_traceback(store: SharedArrayStore, tmp_path: Path) -> None:
    # As `python -m polystore ls | head -0`: the reader is gone before ls writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_cli(
            "ls", "--directory", str(tmp_path), stdout=write_end, stderr=subprocess.PIPE
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode == 1


def test_ls_without_a_match_names_what_is_there(
    store: SharedArrayStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["ls", "--directory", str(tmp_path), "no_such_store"])
    out = capsys.readouterr().out
    assert out.startswith(f"no shared array stores named no_such_store in {tmp_path};")
    assert store.name in out
    empty = tmp_path / "empty"
    empty.mkdir()
    cli.main(["ls", "--directory", str(empty), "no_such_store"])
    assert "nor any other" in capsys.readouterr().out


def test_gc_says_why_it_keeps_a_live_store(
    store: SharedArrayStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["gc", "--directory", str(tmp_path), store.name])
    out = capsys.readouterr().out
    pid = os.getpid()
    assert f"(owner pid {pid}, live): its owner, pid {pid}, is running" in out
    assert f"kept {store.name} (owner pid" in out
    assert "nothing to reclaim" in out
    assert store.get("x")[0] == 1


def test_gc_says_why_it_skips_another_users_store(
    store: SharedArrayStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # the store now belongs to someone else
    cli.main(["gc", "--directory", str(tmp_path), store.name])
    out = capsys.readouterr().out
    assert f"owned by uid {me}, not by you (uid {me + 1})" in out
    assert "only that user, or root, may remove it" in out
