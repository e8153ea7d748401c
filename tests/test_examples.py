"""Every script in examples/ runs, small, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["pipeline.py"]
