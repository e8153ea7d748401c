"""Creating and opening the control segment of a shared-array store.

Whoever creates a store owns it: its control segment is named after the
owner's pid, created exclusively with mode 0600, and its header is written
last of all, magic number at the end, so that a process attaching while it is
being written refuses it. Attaching checks the owner's user id and that the
owner is alive (pid plus start time), and refuses anything else with an error
that says what to do.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..exceptions import StorageError, StoreClosedError, StoreNotFoundError
from . import fork as _fork
from . import layout as ix
from .alloc import reserve_memory, unlink_quietly
from .arena import Arena, forget_created, lookup, note_created, remember

__all__ = ["create_store", "open_store", "owners_of"]

_fork.install()  # before the first arena exists


def owners_of(directory: str, name: str) -> tuple[list[int], list[int]]:
    """Pids of the processes that own a store called ``name``: (this user's, other users').

    Normally one of this user's; a store another user left in a shared
    directory belongs to them, and neither blocks the name nor is attached to.
    """
    suffix = f"-{name}.ctl"
    mine: list[int] = []
    theirs: list[int] = []
    uid = os.getuid()
    for filename in os.listdir(directory):
        if filename.endswith(suffix):
            parsed = ix.parse_filename(filename)
            if parsed is None or parsed[1] != name or not parsed[2]:
                continue
            try:
                owner = os.stat(os.path.join(directory, filename), follow_symlinks=False).st_uid
            except FileNotFoundError:
                continue  # removed while we looked
            (mine if owner == uid else theirs).append(parsed[0])
    return sorted(mine), sorted(theirs)


def create_store(
    directory: str, name: str, config: dict[str, int], spill_dir: str | None = None
) -> Arena:
    """Create the control segment of a new store owned by this process.

    Its fixed tables are backed by memory before anything writes them
    (ShmFullError if there is none); the rest as they grow.
    """
    for pid in owners_of(directory, name)[0]:
        header = ix.read_header(ix.ctl_path(directory, pid, name))
        state = (
            "is in use"
            if header and ix.is_alive(pid, header[ix.H_START])
            else ("was left behind by a dead process; remove it with `python -m polystore gc`")
        )
        raise StorageError(f"a shared array store named {name!r} (owner pid {pid}) {state}")
    layout = ix.Layout(
        config["max_keys"], config["max_blocks"], config["max_procs"], config["max_segs"]
    )
    pid, start = ix.my_identity()
    path = ix.ctl_path(directory, pid, name)
    # Noted before the file exists: an exception at any point from here on
    # (a signal handler's too) leaves it to the exit of this process at worst.
    note_created(directory, name, spill_dir)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another user's, with our pid (another pid namespace)
        forget_created(directory, name)
        msg = f"{path} exists and belongs to another user; choose another name"
        raise StorageError(msg) from None
    except BaseException:
        unlink_quietly(path)  # (ours if it exists: made by the call just cut short)
        forget_created(directory, name)
        raise
    try:
        os.ftruncate(fd, layout.size)  # sparse: only the pages backed cost memory
        reserve_memory(fd, 0, layout.fixed_size, directory)
        arena = Arena(directory, pid, name, fd, layout)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        forget_created(directory, name)
        raise
    # Nobody can attach before the magic number is written: no journal needed.
    h = arena.q
    for slot, value in (
        (ix.H_VERSION, ix.VERSION), (ix.H_CTL_SIZE, layout.size), (ix.H_UID, os.getuid()),
        (ix.H_PID, pid), (ix.H_START, start), (ix.H_MAX_BYTES, config["max_bytes"]),
        (ix.H_CACHE_BYTES, config["cache_bytes"]), (ix.H_MAX_KEYS, layout.max_keys),
        (ix.H_MAX_BLOCKS, layout.max_blocks), (ix.H_MAX_PROCS, layout.max_procs),
        (ix.H_MAX_SEGS, layout.max_segs), (ix.H_ENT_FREE, -1), (ix.H_BLK_FREE, -1),
        (ix.H_CREATED, int(time.time())),
    ):  # fmt: skip
        h[slot] = value
    for c in range(ix.N_CLASSES):
        h[ix.H_CLASS0 + c] = -1
    if spill_dir is not None:
        raw = spill_dir.encode("utf-8", "surrogateescape")
        words = np.frombuffer(raw.ljust(-(-len(raw) // 8) * 8, b"\0"), dtype="<i8")
        for j, word in enumerate(words.tolist()):
            h[ix.H_SPILL_DIR + j] = word
        h[ix.H_SPILL_LEN] = len(raw)
        arena.spill_dir = spill_dir
    h[ix.H_MAGIC] = ix.MAGIC  # last: attaching processes check it
    return remember(arena)


def open_store(directory: str, pid: int, name: str) -> Arena:
    """This process's arena of an existing store, after checking who owns it."""
    arena = lookup(directory, pid, name)
    if arena is not None:
        return arena
    try:
        fd = os.open(ix.ctl_path(directory, pid, name), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        msg = f"no shared array store named {name!r} (owner pid {pid})"
        raise StoreNotFoundError(msg) from None
    try:
        header = ix.header_of(fd)
        uid = os.fstat(fd).st_uid
        if uid != os.getuid() or (header is not None and header[ix.H_UID] != uid):
            raise StorageError(
                f"shared array store {name!r} belongs to user id {uid}, not to this user"
            )
        if header is None or header[ix.H_PID] != pid:
            raise StorageError(f"{ix.ctl_path(directory, pid, name)} is not a shared array store")
        if not ix.is_alive(pid, header[ix.H_START]):
            raise StoreNotFoundError(
                f"the owner (pid {pid}) of shared array store {name!r} is dead; "
                "remove what it left with `python -m polystore gc`"
            )
        if header[ix.H_CLOSED]:
            raise StoreClosedError(f"shared array store {name!r} is closed")
        layout = ix.Layout(
            header[ix.H_MAX_KEYS], header[ix.H_MAX_BLOCKS],
            header[ix.H_MAX_PROCS], header[ix.H_MAX_SEGS],
        )  # fmt: skip
        arena = Arena(directory, pid, name, fd, layout)
    except BaseException:
        os.close(fd)
        raise
    return remember(arena)
