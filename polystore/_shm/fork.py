"""Forking a process that holds views of stored values.

Pins are counted per process, and a child inherits its parent's views without
pinning them: the parent could drop its own views at once, and a writer
would then reuse blocks that the child still reads. So a process that forks
while it holds views keeps each such store locked across the fork; the
child pins the blocks of its inherited views in a row of its own (the parent's
lock covers it, through the open file description they share), says so
through a pipe, and only then does the parent release the lock. A fork
without live views costs nothing extra.

Invariant kept: every store the hooks lock before the fork is released by
the parent after it, even when a signal handler raises (Ctrl-C) in either
hook. CPython reports an exception in a fork hook and forks all the same,
so the hooks that lock and release are C calls (``fast.fork_lock``,
``fast.fork_unlock``) that note each lock in the same call that takes it;
without C, a bytecode boundary stays open in each (tests/test_shm_interrupts.py).
"""

from __future__ import annotations

import functools
import gc
import os
import select
import threading
import warnings
from typing import Any

from ..exceptions import StoreClosedError
from . import arena as _arena
from . import fast as _fast

__all__ = ["FORK_HANDOFF_SECONDS", "install"]

#: (arenas held locked across the fork, read end, write end of the child's "done" pipe)
_handoff: tuple[list[_arena.Arena], int, int] | None = None
#: how long a parent waits for its child to pin what it inherited
FORK_HANDOFF_SECONDS = 10.0


#: the C hooks' state: [stores locked for the child, read end, write end of its pipe]
_state: list[Any] = [[], -1, -1]


def _candidates() -> list[_arena.Arena]:
    """The stores to hold locked across a fork: those with live views not locked here already."""
    me = threading.get_ident()
    return [
        arena
        for arena in list(_arena._all_arenas)
        if arena._refs and not arena.closed and arena._holder != me
    ]


def _before_fork_c() -> None:
    # (a handler raising here has locked nothing yet)
    lock = _fast.fork_lock
    assert lock is not None  # (registered only with C)
    lock(_state, _candidates(), StoreClosedError)


def _before_fork() -> None:
    # Pins are counted per process, so the views a child inherits are pinned by
    # the parent alone, which may drop them at once. Hold each store that has
    # live views locked across the fork, so that no writer frees a block until
    # the child has pinned what it inherited in a row of its own.
    global _handoff
    held = []
    for arena in _candidates():
        try:
            arena.acquire()
        except StoreClosedError:  # closed meanwhile: its views need nothing from us
            continue
        held.append(arena)
    if held:
        try:
            r, w = os.pipe()
        except OSError:  # no pipe, no handshake: the child's views are as before
            for arena in held:
                arena.abort()
            return
        _handoff = (held, r, w)


def _after_fork_in_parent() -> None:
    global _handoff
    if _handoff is None:
        return
    held, r, w = _handoff
    _handoff = None
    os.close(w)
    try:  # the child's byte, or end of file if it died first
        waiter = select.poll()  # not select(): the pipe may be past descriptor 1023
        waiter.register(r, select.POLLIN)
        waiter.poll(FORK_HANDOFF_SECONDS * 1000)
    finally:
        os.close(r)
        # The parent changed nothing in these sections; whatever the journal
        # holds is a row claim of a child that died half way: undo it.
        for arena in held:
            arena.abort()


def _after_fork_in_child() -> None:
    global _handoff
    handoff, _handoff = _handoff, None
    if _state[0]:  # the C hooks' hand-off
        handoff = (list(_state[0]), _state[1], _state[2])
        _state[:] = [[], -1, -1]
    adopted: set[int] = set()
    if handoff is not None:
        held, r, w = handoff
        os.close(r)
        # No garbage collection while pinning: a view dying now would defer
        # its unpin to a list that _after_fork() clears (it holds the
        # parent's deferred unpins), and the child's count would stay high.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for arena in held:
                try:
                    arena.adopt_views()
                    adopted.add(id(arena))
                except Exception as exc:
                    warnings.warn(
                        f"polystore: views inherited from the parent of shared array store "
                        f"{arena.name!r} are not protected in this process: {exc}",
                        RuntimeWarning,
                        stacklevel=1,
                    )
        finally:
            if collecting:
                gc.enable()
            os.write(w, b"\0")
            os.close(w)
    for arena in list(_arena._all_arenas):
        arena._after_fork(id(arena) in adopted)


_installed = False


def install() -> None:
    """Register the fork hooks (once)."""
    global _installed
    if not _installed:
        if _fast.fork_unlock is not None:
            after = functools.partial(
                _fast.fork_unlock, _state, int(FORK_HANDOFF_SECONDS * 1000)
            )  # (no first bytecode: see the module's docstring)
            os.register_at_fork(
                before=_before_fork_c, after_in_parent=after, after_in_child=_after_fork_in_child
            )
        else:
            os.register_at_fork(
                before=_before_fork,
                after_in_parent=_after_fork_in_parent,
                after_in_child=_after_fork_in_child,
            )
        _installed = True
