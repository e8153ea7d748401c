"""Forking a process that holds views of stored values.

Pins are counted per process, and a child inherits its parent's views without
pinning them: the parent could drop its own views at once, and a writer
would then reuse blocks that the child still reads. So a process that forks
while it holds views keeps each such store locked across the fork; the
child pins the blocks of its inherited views in a row of its own (the parent's
lock covers it, through the open file description they share), says so
through a pipe, and only then does the parent release the lock. A fork
without live views costs nothing extra.
"""

from __future__ import annotations

import gc
import os
import select
import threading
import warnings

from ..exceptions import StoreClosedError
from . import arena as _arena

__all__ = ["FORK_HANDOFF_SECONDS", "install"]

#: (arenas held locked across the fork, read end, write end of the child's "done" pipe)
_handoff: tuple[list[_arena.Arena], int, int] | None = None
#: how long a parent waits for its child to pin what it inherited
FORK_HANDOFF_SECONDS = 10.0


def _before_fork() -> None:
    # Pins are counted per process, so the views a child inherits are pinned by
    # the parent alone, which may drop them at once. Hold each store that has
    # live views locked across the fork, so that no writer frees a block until
    # the child has pinned what it inherited in a row of its own.
    global _handoff
    held = []
    me = threading.get_ident()
    for arena in list(_arena._all_arenas):
        if not arena._refs or arena.closed or arena._holder == me:
            continue
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
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _installed = True
