"""Command line: find and reclaim shared array stores.

``python -m polystore ls [--directory DIR] [NAME ...]``
    List every :class:`~polystore.SharedArrayStore` with files in the
    directory (``/dev/shm``, or ``POLYSTORE_SHM_DIR`` if set): name, owner
    pid, state, memory used, keys and files.

``python -m polystore gc [--directory DIR] [--dry-run] [NAME ...]``
    Remove, of the current user's stores, those whose owner is dead (killed
    before it could close them), and stray segment files left without their
    control segment. Stores of live owners are never touched, nor other
    users' stores; ``gc`` says why it keeps each one. Given names, only the
    stores so named are considered.

``python -m polystore info``
    The version, and whether the C fast path of the store is built and in use.

``python -m polystore --version`` prints the version.

States: ``live`` (owner running), ``dead`` (owner gone: ``gc`` removes it),
``closing`` (the owner is removing it right now), ``orphan`` (data segments
without a control segment: ``gc`` removes them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._shm import layout as ix
from ._version import __version__

__all__ = ["StoreFiles", "main", "scan_stores"]


@dataclass
class StoreFiles:
    """What ``/dev/shm`` holds of one store."""

    pid: int
    name: str
    uid: int
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    header: list[int] | None = None
    has_ctl: bool = False
    #: data segments spilled to the store's spill directory, and their bytes on disk
    spilled: list[str] = field(default_factory=list)
    spilled_bytes: int = 0

    @property
    def state(self) -> str:
        """``live``, ``dead``, ``closing`` or ``orphan``."""
        if not self.has_ctl:
            return "orphan"
        if self.header is None:
            # Being created, or torn: only the owner's pid tells which.
            return "live" if ix.start_time(self.pid) is not None else "dead"
        if not ix.is_alive(self.pid, self.header[ix.H_START]):
            return "dead"
        return "closing" if self.header[ix.H_CLOSED] else "live"

    @property
    def keys(self) -> int | None:
        """Number of keys, if the control segment is readable."""
        return None if self.header is None else self.header[ix.H_NKEYS]


def scan_stores(directory: str | None = None) -> list[StoreFiles]:
    """Every store with files in ``directory`` (the default one if None), by owner pid and name."""
    groups: dict[tuple[int, str], StoreFiles] = {}
    try:
        entries = list(os.scandir(directory or ix.default_dir()))
    except FileNotFoundError:
        return []
    for entry in entries:
        parsed = ix.parse_filename(entry.name)
        if parsed is None:
            continue
        pid, name, is_ctl = parsed
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we looked
        if not entry.is_file(follow_symlinks=False):
            continue
        group = groups.setdefault((pid, name), StoreFiles(pid, name, st.st_uid))
        group.files.append(entry.path)
        group.bytes += st.st_blocks * 512  # memory in use, not the sparse size
        if is_ctl:
            group.has_ctl = True
            group.header = ix.read_header(entry.path)
    for group in groups.values():
        _find_spilled(group)
    return [groups[k] for k in sorted(groups)]


def _find_spilled(group: StoreFiles) -> None:
    """Add the files a store spilled to its spill directory (named in its header)."""
    spill = None if group.header is None else ix.spill_dir_of(group.header)
    if spill is None:
        return
    prefix = f"{ix.PREFIX}{group.pid}-{group.name}."
    try:
        entries = list(os.scandir(spill))
    except OSError:
        return  # gone, or not ours to read
    for entry in entries:
        parsed = ix.parse_filename(entry.name)
        if entry.name.startswith(prefix) and parsed is not None and not parsed[2]:
            try:
                group.spilled_bytes += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            group.spilled.append(entry.path)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KB", "MB", "GB", "TB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def _named(names: Sequence[str], directory: str | None) -> list[StoreFiles]:
    return [s for s in scan_stores(directory) if not names or s.name in names]


def _nothing_named(names: Sequence[str], directory: str | None) -> str:
    """Why ``ls`` or ``gc`` found nothing: no stores at all, or none of these names."""
    where = directory or ix.default_dir()
    if not names:
        return f"no shared array stores in {where}"
    others = sorted({s.name for s in scan_stores(directory)})
    wanted = ", ".join(names)
    if not others:
        return f"no shared array stores named {wanted} in {where}, nor any other"
    return (
        f"no shared array stores named {wanted} in {where}; "
        f"the stores there are: {', '.join(others)}"
    )


def cmd_ls(names: Sequence[str] = (), directory: str | None = None) -> int:
    """``ls``: print one line per store."""
    stores = _named(names, directory)
    if not stores:
        print(_nothing_named(names, directory))
        return 0
    head = f"{'NAME':<24} {'OWNER':>8} {'STATE':<8} {'SIZE':>10} {'KEYS':>6} {'FILES':>6}"
    print(f"{head} {'SPILLED':>10}")
    for s in stores:
        keys = "-" if s.keys is None else str(s.keys)
        spilled = _size(s.spilled_bytes) if s.spilled else "-"
        print(
            f"{s.name:<24} {s.pid:>8} {s.state:<8} {_size(s.bytes):>10} {keys:>6} "
            f"{len(s.files) + len(s.spilled):>6} {spilled:>10}"
        )
    return 0


def _why_kept(s: StoreFiles, uid: int) -> str | None:
    """Why ``gc`` leaves a store alone, or ``None`` if it may remove it."""
    if s.uid != uid:
        return (
            f"owned by uid {s.uid}, not by you (uid {uid}): only that user, or root, may remove it"
        )
    if s.state == "live":
        return f"its owner, pid {s.pid}, is running"
    if s.state == "closing":
        return f"its owner, pid {s.pid}, is removing it right now"
    return None


def cmd_gc(dry_run: bool = False, names: Sequence[str] = (), directory: str | None = None) -> int:
    """``gc``: remove the current user's dead and orphaned stores; say why others stay."""
    uid = os.getuid()
    stores = _named(names, directory)
    if not stores:
        print(f"nothing to reclaim: {_nothing_named(names, directory)}")
        return 0
    removed = 0
    for s in stores:
        why = _why_kept(s, uid)
        if why is not None:
            print(f"kept {s.name} (owner pid {s.pid}, {s.state}): {why}")
            continue
        verb = "would remove" if dry_run else "removed"
        if not dry_run:
            # data segments first, the control segment last (see Arena.destroy)
            for path in sorted(s.spilled + s.files, key=lambda p: p.endswith(".ctl")):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass  # someone else removed it meanwhile
        print(f"{verb} {s.name} (owner pid {s.pid}, {s.state}): {len(s.files)} files, "
              f"{_size(s.bytes)}")  # fmt: skip
        removed += 1
    if not removed:
        print("nothing to reclaim")
    return 0


def cmd_info() -> int:
    """``info``: the version and the state of the C fast path."""
    from ._shm import fast

    if fast.ENABLED:
        state = "active"
    elif fast.AVAILABLE:
        state = "built, but turned off by POLYSTORE_NO_FASTPATH in the environment"
    else:
        state = (
            "not built: this install runs the pure-Python paths (no C compiler at "
            "install time, or POLYSTORE_PURE_PYTHON=1)"
        )
    print(f"polystore {__version__}")
    print(f"C fast path of the shared-memory store: {state}")
    print(f"shared-memory directory: {ix.default_dir()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m polystore``."""
    parser = argparse.ArgumentParser(
        prog="python -m polystore", description="Find and reclaim polystore shared memory."
    )
    parser.add_argument("--version", action="version", version=f"polystore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list shared array stores")
    gc = sub.add_parser("gc", help="remove stores whose owner process is dead")
    sub.add_parser("info", help="show the version and whether the C fast path is in use")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    for command in (ls, gc):
        command.add_argument(
            "--directory",
            metavar="DIR",
            help=f"where the stores live (default: ${ix.DIR_ENV} or {ix.SHM_DIR})",
        )
        command.add_argument("names", nargs="*", metavar="NAME", help="only stores so named")
    args = parser.parse_args(argv)
    directory = getattr(args, "directory", None)
    if directory is not None and not os.path.isdir(directory):
        parser.error(f"--directory {directory}: not a directory")
    try:
        if args.command == "info":
            code = cmd_info()
        elif args.command == "ls":
            code = cmd_ls(args.names, args.directory)
        else:
            code = cmd_gc(args.dry_run, args.names, args.directory)
        sys.stdout.flush()  # here, so a closed pipe is reported below and not at exit
    except BrokenPipeError:
        # The reader stopped reading (``ls | head``): not worth a traceback.
        # Point stdout at /dev/null so the interpreter's last flush finds no pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
