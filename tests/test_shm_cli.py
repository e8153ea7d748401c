"""``python -m polystore ls`` and ``python -m polystore gc``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from polystore._shm import layout as ix
from polystore.shmstore import SharedArrayStore

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))

OWNER = """
import time, numpy as np
from polystore import SharedArrayStore
s = SharedArrayStore({name!r})
s.put("a", np.ones(300_000))
s.put("b", np.ones(10))
print("ready", flush=True)
time.sleep(60)
"""


def cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "polystore", *args],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    assert proc.stderr == ""
    return proc.stdout


def line_of(listing: str, name: str) -> list[str]:
    rows = [row.split() for row in listing.splitlines() if row.split()[:1] == [name]]
    assert len(rows) == 1, listing
    return rows[0]


def files_of(pid: int, name: str) -> list[str]:
    return [n for n in os.listdir(ix.SHM_DIR) if n.startswith(f"{ix.PREFIX}{pid}-{name}.")]


@pytest.fixture
def killed_owner() -> Iterator[tuple[int, str]]:
    """A store whose owner was SIGKILLed: (owner pid, name). Removed afterwards."""
    name = f"cli_killed_{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER.format(name=name)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    yield proc.pid, name
    for leftover in files_of(proc.pid, name):
        os.unlink(os.path.join(ix.SHM_DIR, leftover))


@pytest.mark.timeout(120)
def test_ls_and_gc_reclaim_a_killed_owner(killed_owner: tuple[int, str]) -> None:
    pid, name = killed_owner
    assert len(files_of(pid, name)) >= 2
    with SharedArrayStore() as live:
        live.put("x", np.ones(10))
        listing = cli("ls")
        assert line_of(listing, name)[1:3] == [str(pid), "dead"]
        assert line_of(listing, name)[-3:] == ["2", str(len(files_of(pid, name))), "-"]
        assert line_of(listing, live.name)[1:3] == [str(os.getpid()), "live"]

        dry = cli("gc", "--dry-run", name, live.name)
        assert f"would remove {name}" in dry and files_of(pid, name)

        # Names keep the test from removing what other test runs left around.
        done = cli("gc", name, live.name)
        assert f"removed {name}" in done and f"kept {live.name} (owner pid" in done
        assert files_of(pid, name) == []
        assert live.get("x")[0] == 1  # a live store is never touched
        assert name not in cli("ls") and cli("ls", name).startswith("no shared array stores")


def test_gc_removes_orphaned_segments() -> None:
    pid = 2**22 + 12345  # above the default pid_max: no such process
    orphan = ix.seg_path(ix.SHM_DIR, pid, "cli_orphan", 0, 1)
    with open(orphan, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        assert line_of(cli("ls"), "cli_orphan")[1:3] == [str(pid), "orphan"]
        assert "removed cli_orphan" in cli("gc", "cli_orphan")
        assert not os.path.exists(orphan)
    finally:
        if os.path.exists(orphan):
            os.unlink(orphan)


def test_ls_with_nothing_and_unrelated_files() -> None:
    unrelated = os.path.join(ix.SHM_DIR, f"{ix.PREFIX}{os.getpid()}-not-a-store")
    with open(unrelated, "wb"):
        pass
    try:
        listing = cli("ls")
        assert "not-a-store" not in listing
        assert "nothing to reclaim" in cli("gc", f"{os.getpid()}-not-a-store", "not-a-store")
        assert os.path.exists(unrelated)  # not ours to remove
    finally:
        os.unlink(unrelated)
