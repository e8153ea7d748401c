"""Interrupt storms: scripts run in a fresh interpreter whose SIGALRM handler raises.

Shared by the storm tests of the store, the FileManager, the disk backend and
the Manager dict; each script sets its own timer and checks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: the start of a storm script: an exception class, and a SIGALRM handler that
#: raises it while ``armed`` is true
PRELUDE = r"""
import signal

class Interrupted(Exception):
    pass

armed = False

def handler(signum, frame):
    if armed:
        raise Interrupted

signal.signal(signal.SIGALRM, handler)
"""


def run_storm(script: str | Path, *args: str) -> list[str]:
    """Run a storm script (its text, or a file) in a new interpreter; the words it printed.

    Fails the test, with the end of its error output, if the script did not succeed.
    """
    command = [str(script)] if isinstance(script, Path) else ["-c", script]
    proc = subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()
