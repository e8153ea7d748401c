"""Path handling shared by the backends.

Backends accept ``str`` and :class:`os.PathLike` paths. In-memory backends map
them onto a virtual POSIX tree rooted at ``/``: ``a/b`` and ``/a/b`` name the
same entry, ``.`` and empty components vanish, and ``..`` is resolved lexically
without ever climbing above ``/``.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from typing import TypeAlias

from .exceptions import SandboxError

__all__ = [
    "RESERVED_PREFIX",
    "PathArg",
    "as_str",
    "in_root",
    "is_inside",
    "join_listing",
    "natural_key",
    "sort_listing",
    "split_ext",
    "virtual",
    "virtual_parents",
]

#: The type of every path argument of a backend or a FileManager. A path is a
#: ``str`` or an :class:`os.PathLike` that gives one (``pathlib.Path``); bytes
#: paths are refused with ``TypeError``.
PathArg: TypeAlias = "str | os.PathLike[str]"

_DIGITS = re.compile(r"[0-9]+")


def as_str(path: object, what: str = "path") -> str:
    """Return ``path`` as ``str``; refuse anything that is not a path.

    Raises:
        TypeError: ``path`` is neither ``str`` nor ``os.PathLike[str]``.
        ValueError: ``path`` is empty or contains a NUL character.
    """
    if isinstance(path, str):
        text = path
    elif isinstance(path, os.PathLike):
        text = os.fspath(path)
        if not isinstance(text, str):
            raise TypeError(f"{what} must be str or os.PathLike[str], got bytes path {text!r}")
    else:
        raise TypeError(f"{what} must be str or os.PathLike, got {type(path).__name__}: {path!r}")
    if not text:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL characters: {text!r}")
    return text


def virtual(path: object) -> str:
    """Normalise ``path`` to an absolute virtual POSIX path (``/`` is the root)."""
    return _virtual(as_str(path))


#: names starting with this hold polystore's own temporary, lock and metadata files
RESERVED_PREFIX = ".polystore-"


@functools.lru_cache(maxsize=8192)
def _virtual(text: str) -> str:
    if os.sep == "\\":
        text = text.replace("\\", "/")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        if part.startswith(RESERVED_PREFIX):
            from .exceptions import ReservedNameError

            raise ReservedNameError(text, RESERVED_PREFIX)
        parts.append(part)
    return "/" + "/".join(parts)


def virtual_parents(vpath: str) -> tuple[str, ...]:
    """Ancestors of a virtual path, nearest last, without ``/`` itself."""
    # posixpath.dirname, inlined; the rest is cached by directory, which the
    # files of a pipeline share where their own paths are each new
    # (benchmarks/pipeline.py makes 136 new paths a pass in three directories).
    head = vpath[: vpath.rfind("/") + 1]
    if head.strip("/"):
        head = head.rstrip("/")
    return _dir_and_parents(head)


@functools.lru_cache(maxsize=4096)
def _dir_and_parents(directory: str) -> tuple[str, ...]:
    out: list[str] = []
    while directory.strip("/"):  # ("/", "//" and "" have no parent to name)
        out.append(directory)
        directory = posixpath.dirname(directory)
    out.reverse()
    return tuple(out)


def split_ext(path: str) -> str:
    """Lower-case extension of the last component, with the dot (``""`` if none).

    Same answer as :func:`os.path.splitext`: leading dots of a name do not
    start an extension.
    """
    name = path[path.rfind("/") + 1 :]
    dot = name.rfind(".")
    if dot <= 0 or name[:dot].strip(".") == "":
        return ""
    return name[dot:].lower()


def join_listing(directory: str, relatives: Iterable[str]) -> list[str]:
    """Join relative POSIX names onto ``directory`` as the caller spelled it, sorted.

    Every backend builds ``list_files`` results this way, so the same call
    answers with the same strings on every backend.
    """
    base = directory if directory in ("/", "") else directory.rstrip("/")
    if base == "":
        base = "."
    return sorted(posixpath.join(base, rel) for rel in relatives)


#: the orders a listing can be asked for (see :func:`sort_listing`)
SORT_ORDERS = ("name", "natural")


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders runs of digits by their value: ``img2`` before ``img10``.

    The text is cut into alternating non-digit and digit runs, so runs of
    the same kind meet at the same positions of any two keys; ``text`` itself
    comes last and breaks ties (``img02`` and ``img2``), so the order is total.
    """
    runs: list[object] = []
    start = 0
    for match in _DIGITS.finditer(text):
        runs.append(text[start : match.start()])
        runs.append(int(match.group()))
        start = match.end()
    runs.append(text[start:])
    runs.append(text)
    return tuple(runs)


def sort_listing(paths: Iterable[str], sort: str = "name") -> list[str]:
    """``paths`` in the order ``sort`` names.

    ``"name"`` (the default everywhere) compares by code point, as
    :func:`sorted` does; ``"natural"`` compares runs of digits by value, as
    the original polystore listed files.

    Raises:
        ValueError: ``sort`` is not one of :data:`SORT_ORDERS`.
    """
    if sort == "name":
        return sorted(paths)
    if sort == "natural":
        return sorted(paths, key=natural_key)
    raise ValueError(f"sort must be one of {', '.join(map(repr, SORT_ORDERS))}, got {sort!r}")


# -- paths under a root ---------------------------------------------------------


def in_root(root: str, text: str) -> str:
    """The operating-system path that ``text`` names under ``root`` (a real path).

    Raises:
        SandboxError: the path, symbolic links followed, leaves ``root``.
    """
    full = os.path.join(root, text)
    resolved = _plain_path(root, full)
    if resolved is not None:
        return resolved
    real = os.path.realpath(full)
    if not is_inside(root, real):
        raise SandboxError(text, root)
    return real


def is_inside(root: str, real: str) -> bool:
    """Whether the real path ``real`` is ``root`` or lies below it."""
    return os.path.commonpath([root, real]) == root


def _plain_path(root: str, full: str) -> str | None:
    """``full`` normalised, if it lies in ``root`` without ``..`` or links; else ``None``.

    The common case costs one ``lstat`` per name below the root instead
    of :func:`os.path.realpath`'s walk from ``/``.
    """
    base = root.rstrip(os.sep)
    if full != root and not full.startswith(base + os.sep):
        return None
    parts = [p for p in full[len(base) :].split(os.sep) if p not in ("", ".")]
    if ".." in parts:
        return None
    path = base
    for i, part in enumerate(parts):
        path = path + os.sep + part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            # Nothing below a missing name can be a link.
            return os.sep.join([path, *parts[i + 1 :]])
        except OSError:
            return None  # let realpath and the operation itself report it
        if stat.S_ISLNK(mode):
            return None
    return path or os.sep
