"""A file and its metadata, committed together.

The disk backend keeps a file's metadata in a hidden sidecar,
``.polystore-meta-<name>.json``. Two renames (the file's and the sidecar's)
cannot happen at once, so the sidecar holds entries that say which version of
the file they describe: the file's identity (inode number, size and
modification time, which a rename keeps) and its metadata, ``null`` for a
version without any.

A sidecar with one entry describes whatever file has the name, so the
metadata survives ``touch``, ``cp -a`` and ``rsync``, which change the
identity. A sidecar with two entries exists only during a commit, or after a
writer died in one: the file at the name then takes the entry with its own
identity. The old and the new file both exist while both entries are written,
so their inode numbers differ and exactly one entry matches.

A save commits in three steps, each one atomic:

1. the sidecar is replaced by one holding the old file's entry and the new
   file's (the new file is complete under its temporary name, so its identity
   is known);
2. the file is renamed onto its name;
3. the sidecar is replaced by one holding only the new entry, or removed if
   the new file has no metadata.

Whenever a writer dies, the file at the name finds its own entry: the old file
its old metadata before step 2, the new file its new metadata (or none) after
it. Step 1 is skipped when neither version has metadata, so a plain save
writes nothing but the file.

Extended attributes would move with the file in one rename, but not every file
system has them (tmpfs on older kernels, many network file systems), ext4
caps them at a few KiB, and copies drop them unless asked: one mechanism that
holds everywhere is easier to trust than two.

Everything here except reading runs under the directory's commit lock.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from ._atomic import remove_quietly, write_atomic
from .exceptions import CorruptFileError
from .formats import parse_metadata
from .locks import META_PREFIX, directory_lock

__all__ = [
    "Entry",
    "finish",
    "identity",
    "metadata_of",
    "read_entries",
    "settle",
    "stage",
    "write_entries",
]

#: readings of a file's metadata tried while writers keep replacing the file
_READ_TRIES = 1000
#: tells a sidecar of this layout from anything else found under the name
_LAYOUT = "polystore-metadata-1"

Identity = tuple[int, int, int]
Entry = tuple[Identity, "dict[str, Any] | None"]


def identity(st: os.stat_result) -> Identity:
    """What tells one version of a file from another: a rename keeps it, a rewrite does not."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _stat(path: str) -> Identity | None:
    try:
        return identity(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_entries(sidecar: str, text: str) -> list[Entry]:
    """The entries in ``sidecar`` (none if it is missing); ``text`` names the data file.

    Raises:
        CorruptFileError: the sidecar is not one that polystore wrote.
    """
    try:
        with open(sidecar, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return []
    doc = parse_metadata(raw, text)
    versions = doc.get("versions")
    if doc.get("layout") != _LAYOUT or not isinstance(versions, list):
        raise CorruptFileError(text, "its metadata file has an unknown layout")
    entries: list[Entry] = []
    for item in versions:
        if not isinstance(item, dict):
            raise CorruptFileError(text, "its metadata file holds an entry that is not an object")
        ident, meta = item.get("file"), item.get("metadata")
        if not (
            isinstance(ident, list)
            and len(ident) == 3
            and all(type(n) is int for n in ident)
            and (meta is None or isinstance(meta, dict))
        ):
            raise CorruptFileError(text, "its metadata file holds a malformed entry")
        entries.append(((ident[0], ident[1], ident[2]), meta))
    return entries


def _find(entries: list[Entry], ident: Identity | None) -> dict[str, Any] | None:
    """The metadata of the version ``ident``: the only entry, or the one with its identity."""
    if len(entries) == 1:
        return entries[0][1]
    for found, meta in entries:
        if found == ident:
            return meta
    return None


def metadata_of(target: str, sidecar: str, text: str) -> dict[str, Any] | None:
    """The metadata of the file now at ``target``, or ``None`` when it has none.

    The file is looked at before and after the sidecar is read; if a writer
    replaced it meanwhile, the reading is repeated, so the answer always
    belongs to one version of the file.
    """
    for _ in range(_READ_TRIES):
        before = _stat(target)
        if before is None:
            return None
        entries = read_entries(sidecar, text)
        if _stat(target) == before:
            return _find(entries, before)
    raise BlockingIOError(
        errno.EAGAIN, f"the file was replaced {_READ_TRIES} times while its metadata was read", text
    )


def write_entries(sidecar: str, entries: list[Entry], durable: bool) -> None:
    """Replace ``sidecar`` atomically by one holding ``entries`` (removing it if there are none)."""
    if not entries:
        remove_quietly(sidecar)
        return
    doc = {
        "layout": _LAYOUT,
        "versions": [{"file": list(ident), "metadata": meta} for ident, meta in entries],
    }
    write_atomic(sidecar, json.dumps(doc).encode("utf-8"), fsync=durable)


def stage(
    target: str, sidecar: str, incoming: str, meta: dict[str, Any] | None, text: str, durable: bool
) -> list[Entry]:
    """Step 1: make ``sidecar`` hold the entries of the file at ``target`` and of ``incoming``.

    ``incoming`` is the complete file about to be renamed onto ``target``.
    Returns what to put back with :func:`write_entries` should that rename fail.
    """
    try:
        entries = read_entries(sidecar, text)
    except CorruptFileError:
        entries = []  # unreadable metadata is not kept: the save replaces it
    current = _stat(target)
    old = _find(entries, current) if current is not None else None
    if meta is None and old is None:
        return entries
    new_ident = _stat(incoming)
    if new_ident is None:
        raise FileNotFoundError(incoming)
    kept: list[Entry] = [] if current is None else [(current, old)]
    write_entries(sidecar, [*kept, (new_ident, meta)], durable)
    return entries


def finish(target: str, sidecar: str, meta: dict[str, Any] | None, durable: bool) -> None:
    """Step 3: after the rename, keep only the entry of the file now at ``target``."""
    ident = _stat(target)
    if meta is None or ident is None:
        remove_quietly(sidecar)
    else:
        write_entries(sidecar, [(ident, meta)], durable)


def settle(directory: str, lock_timeout: float | None) -> list[str]:
    """Reduce the sidecars a killed writer left with two entries to the one that applies.

    Until then the file finds its entry by identity, which a copy of the
    directory (new inodes) would lose. Returns the names of the sidecars settled.
    """
    settled = []
    with os.scandir(directory) as found:
        names = [e.name for e in found if e.name.startswith(META_PREFIX)]
    for name in names:
        data_name = name[len(META_PREFIX) : -len(".json")]
        if data_name.startswith("#"):
            continue  # a hashed name cannot be traced back to its file
        sidecar = os.path.join(directory, name)
        target = os.path.join(directory, data_name)
        try:
            if len(read_entries(sidecar, data_name)) < 2:
                continue
            with directory_lock(directory, lock_timeout):  # no commit is under way
                entries = read_entries(sidecar, data_name)
                ident = _stat(target)
                meta = _find(entries, ident) if ident is not None else None
                if len(entries) > 1:
                    kept: list[Entry] = [] if meta is None or ident is None else [(ident, meta)]
                    write_entries(sidecar, kept, False)
                    settled.append(name)
        except CorruptFileError:
            continue  # not ours to repair: load_metadata reports it
    return settled
