"""Test-only fault injection: the store's write paths count their steps, and can die at one.

Every step at which a process killed by SIGKILL leaves shared memory in a
different state calls :func:`step` (the C fast path counts its own steps the
same way). A test arms a counter in a child process, lets it run one
operation, and checks from another process that the store is whole: see
``tests/test_shm_crash.py``. Disarmed (the default), a step costs one
attribute read.
"""

from __future__ import annotations

import os
import signal
from typing import Any

__all__ = ["arm", "step"]

#: 0: off; -1: count steps only; N > 0: SIGKILL this process at step N
kill_at = 0
#: steps taken since the last arm()
steps = 0


def arm(at: int) -> int:
    """Count steps from now on and die at step ``at`` (-1: never, 0: stop counting).

    With the C fast path built, one count covers the steps of both (an
    operation may begin in Python and end in C, as ``create`` does);
    :data:`steps` still counts the Python ones. Returns the number of steps
    taken (Python and C) since the previous call.
    """
    global kill_at, steps, _c_step
    taken = steps
    kill_at, steps = at, 0
    from .fast import AVAILABLE, _fastpath

    if AVAILABLE:
        taken = _fastpath._arm_faults(at)
        _c_step = _fastpath._fault_step
    return taken


def step() -> None:
    """One step of a write path: die here if this is the step the test chose."""
    global steps
    steps += 1
    if _c_step is not None:
        _c_step()  # the shared count, which dies at the chosen step
    elif steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


#: the C count's step function, once arm() found the fast path built
_c_step: Any = None
