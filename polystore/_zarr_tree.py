"""Where a zarr backend's paths live, and what the nodes there are.

A :class:`Locator` maps a path to its hierarchy and to the node's key inside it,
refusing paths that escape the backend's root.

A :class:`Hierarchy` answers the questions the zarr backend asks most often
(is this key an array, a group or nothing; what are a group's children; what
are an array's attributes) by reading the metadata documents itself: one small
file read per question, where a zarr call costs hundreds of microseconds.
Storage is a local directory (:class:`LocalTree`) or any fsspec file system
(:class:`FsspecTree`).

On a local file system a hierarchy also publishes whole arrays atomically: the
new array is built in a private temporary directory inside the hierarchy and
renamed into place (:func:`publish`), so readers see the old array or the new
one, never a half-written one.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import posixpath
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Hashable
from functools import cache
from typing import Any, Literal

from .exceptions import ReservedNameError, SandboxError
from .locks import pid_alive
from .paths import RESERVED_PREFIX

__all__ = ["PRIVATE_DIR", "FsspecTree", "Hierarchy", "LocalTree", "Locator", "Tree", "publish"]

#: the directory, at the top of a hierarchy, that holds lock files and temporary arrays
PRIVATE_DIR = RESERVED_PREFIX + "zarr"

#: metadata documents: the one that marks an array, the one that marks a group
#: names that are metadata documents, never nodes
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


def _join(key: str, name: str) -> str:
    return f"{key}/{name}" if key else name


class Tree:
    """Byte-level access to the storage under a hierarchy's root."""

    #: whether the tree is a local directory (atomic renames and locks work)
    local: bool = False

    def read(self, key: str) -> bytes | None:
        """The bytes stored at ``key``, or ``None`` when there are none."""
        raise NotImplementedError

    def names(self, key: str) -> list[str]:
        """Names directly under ``key`` (empty when ``key`` is missing)."""
        raise NotImplementedError

    def remove(self, key: str) -> None:
        """Remove ``key`` and everything under it."""
        raise NotImplementedError

    def version(self, key: str) -> Hashable | None:
        """Something that changes whenever the object at ``key`` is replaced."""
        return None


class LocalTree(Tree):
    """A directory of the local file system."""

    local = True

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, key: str) -> str:
        """The file-system path of ``key``."""
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def names(self, key: str) -> list[str]:
        try:
            return os.listdir(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, key: str) -> None:
        shutil.rmtree(self.path(key))

    def version(self, key: str) -> Hashable | None:
        try:
            st = os.stat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FsspecTree(Tree):
    """A prefix of an fsspec file system (``memory://``, ``s3://``, ...)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        # fsspec ships no type information: reach it through importlib, as Any
        url_to_fs = importlib.import_module("fsspec.core").url_to_fs
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(url, **self.storage_options)
        self.root = str(root).rstrip("/")

    def path(self, key: str) -> str:
        """The file-system path of ``key``."""
        return f"{self.root}/{key}" if key else self.root

    def read(self, key: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self.path(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data

    def names(self, key: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(key), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [posixpath.basename(str(e).rstrip("/")) for e in entries]

    def remove(self, key: str) -> None:
        self.fs.rm(self.path(key), recursive=True)


class Hierarchy:
    """One zarr hierarchy: a tree of groups (directories) and arrays (files).

    Args:
        root: where the hierarchy lives, a local path or a URL; also the
            identity that lock names are derived from.
        tree: access to its storage.
        zarr_format: 2 or 3, what new nodes are written as (both are read).
        implicit_root: the root is a group even before its metadata exists
            (a backend built on one root directory).
    """

    def __init__(self, root: str, tree: Tree, zarr_format: int, implicit_root: bool) -> None:
        self.root = root
        self.tree = tree
        self.zarr_format = zarr_format
        self.implicit_root = implicit_root
        self._store: Any = None
        self._cleaned = False

    def store(self) -> Any:
        """The zarr store of this hierarchy, built on first use."""
        if self._store is None:
            from zarr.storage import FsspecStore, LocalStore

            if isinstance(self.tree, LocalTree):
                self._store = LocalStore(self.tree.root)
            else:
                assert isinstance(self.tree, FsspecTree)
                self._store = FsspecStore.from_url(
                    self.tree.url, storage_options=self.tree.storage_options
                )
        return self._store

    # -- what is where ------------------------------------------------------
    # Reading recognises both formats, whatever ``zarr_format`` says: stores
    # written by older tools are zarr v2. ``zarr_format`` only decides what new
    # nodes are written as.
    def _node_type(self, key: str) -> str | None:
        raw = self.tree.read(_join(key, "zarr.json"))
        if raw is not None:
            node_type = json.loads(raw).get("node_type")
            return node_type if isinstance(node_type, str) else None
        if self.tree.read(_join(key, ".zarray")) is not None:
            return "array"
        if self.tree.read(_join(key, ".zgroup")) is not None:
            return "group"
        return None

    def kind(self, key: str) -> Literal["file", "dir"] | None:
        """``"file"`` for an array, ``"dir"`` for a group, ``None`` for nothing."""
        node_type = self._node_type(key)
        if node_type == "array":
            return "file"
        if node_type == "group" or (not key and self.implicit_root):
            return "dir"
        return None

    def has_metadata(self, key: str) -> bool:
        """Whether a node's metadata document exists at ``key`` (implicit root excluded)."""
        return self._node_type(key) is not None

    def children(self, key: str) -> list[str]:
        """Sorted names of the nodes directly inside the group ``key``."""
        names = []
        for name in self.tree.names(key):
            if name in METADATA_NAMES or name.startswith(RESERVED_PREFIX):
                continue
            if self.kind(_join(key, name)) is not None:
                names.append(name)
        return sorted(names)

    def attributes(self, key: str) -> dict[str, Any]:
        """The attributes of the node at ``key`` (empty when it has none)."""
        raw = self.tree.read(_join(key, "zarr.json"))
        if raw is not None:
            attrs = json.loads(raw).get("attributes", {})
        else:
            raw = self.tree.read(_join(key, ".zattrs"))
            attrs = {} if raw is None else json.loads(raw)
        return dict(attrs)

    def version(self, key: str) -> Hashable | None:
        """Identity of the metadata document of the array ``key`` (local trees only)."""
        found = self.tree.version(_join(key, "zarr.json"))
        return found if found is not None else self.tree.version(_join(key, ".zarray"))

    # -- private space (local trees) -------------------------------------------
    def private_dir(self, name: str) -> str:
        """A directory under :data:`PRIVATE_DIR` of a local hierarchy."""
        assert isinstance(self.tree, LocalTree)
        return os.path.join(self.tree.root, PRIVATE_DIR, name)

    def temporary_path(self) -> str:
        """A fresh path for a temporary array, on the hierarchy's file system.

        The name carries host and pid, so that leftovers of killed writers can
        be recognised: the first call in a process removes them.
        """
        tmp = self.private_dir("tmp")
        os.makedirs(tmp, exist_ok=True)
        if not self._cleaned:
            self._cleaned = True
            _remove_orphans(tmp)
        return os.path.join(tmp, f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")


# -- from paths to nodes ------------------------------------------------------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def canonical(text: str) -> str:
    """A local path made absolute, or a URL; ``file://`` URLs become local paths."""
    if text.startswith("file://"):
        text = text[len("file://") :]
    if _URL.match(text):
        scheme, rest = text.split("://", 1)
        rest = posixpath.normpath(rest) if rest else ""
        return f"{scheme}://{'' if rest == '.' else rest}"
    return os.path.abspath(text)


class Locator:
    """Finds the hierarchy a path belongs to, and the key of its node there.

    Args:
        root: the one hierarchy's directory or URL (already :func:`canonical`),
            or ``None``: then each path's hierarchy is its first ``*.zarr``
            directory.
        zarr_format: passed to every :class:`Hierarchy`.
        storage_options: passed to fsspec for URLs.
    """

    def __init__(self, root: str | None, zarr_format: int, storage_options: dict[str, Any]) -> None:
        self.root = root
        self.zarr_format = zarr_format
        self.storage_options = storage_options
        self._hierarchies: dict[str, Hierarchy] = {}
        self._guard = threading.Lock()

    def locate(self, text: str) -> tuple[Hierarchy, str]:
        """The hierarchy of the path ``text`` and the key of its node.

        Raises:
            SandboxError: the path lies outside the root.
            ValueError: without a root, the path has no ``*.zarr`` directory;
                or it uses a name reserved for metadata or for polystore.
        """
        root = self.root
        if root is None:
            return self._locate_store(text)
        rel = text
        if _URL.match(text) or os.path.isabs(text):
            full = canonical(text)
            top = root.rstrip("/")
            if full == root:
                rel = ""
            elif full.startswith(top + "/"):
                rel = full[len(top) + 1 :]
            else:
                raise SandboxError(text, root)
        return self._hierarchy(root, implicit_root=True), _clean_key(rel, text, root)

    def _locate_store(self, text: str) -> tuple[Hierarchy, str]:
        full = canonical(text)
        if _URL.match(full):
            scheme, rest = full.split("://", 1)
            prefix, parts = f"{scheme}://", rest.split("/")
        else:
            prefix, parts = "", full.split(os.sep)
        for i, part in enumerate(parts):
            if part.lower().endswith(".zarr"):
                root = prefix + "/".join(parts[: i + 1])
                key = _clean_key("/".join(parts[i + 1 :]), text, root)
                return self._hierarchy(root, implicit_root=False), key
        raise ValueError(
            f"ZarrBackend() without a root keeps arrays inside '*.zarr' directories, and "
            f"{text!r} has none; use a path such as 'out/plate.zarr/A/1', or build "
            "ZarrBackend(root=...)"
        )

    def _hierarchy(self, root: str, implicit_root: bool) -> Hierarchy:
        found = self._hierarchies.get(root)
        if found is not None:
            return found
        tree: Tree = FsspecTree(root, self.storage_options) if _URL.match(root) else LocalTree(root)
        hierarchy = Hierarchy(root, tree, self.zarr_format, implicit_root)
        with self._guard:
            return self._hierarchies.setdefault(root, hierarchy)


def _clean_key(rel: str, text: str, root: str) -> str:
    """Resolve ``.`` and ``..`` in a relative path, without leaving the root."""
    parts: list[str] = []
    for part in rel.replace(os.sep, "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise SandboxError(text, root)
            parts.pop()
            continue
        if part.startswith(RESERVED_PREFIX):
            raise ReservedNameError(text, RESERVED_PREFIX)
        if part in METADATA_NAMES:
            raise ValueError(f"{text!r}: {part!r} is the name of a zarr metadata document")
        parts.append(part)
    return "/".join(parts)


_HOST = socket.gethostname().replace("-", "_")


def _remove_orphans(tmp: str) -> None:
    """Remove temporary arrays of dead processes of this host."""
    for name in os.listdir(tmp):
        host, _, rest = name.partition("-")
        pid = rest.partition("-")[0]
        if host != _HOST or not pid.isdigit() or pid_alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)  # another cleaner may race


# -- atomic publication on local file systems -----------------------------------


@cache
def _renameat2() -> Any:
    """The C library's ``renameat2`` (Linux, glibc >= 2.28), or ``None``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


def _exchange(src: str, dst: str) -> bool:
    """Swap ``src`` and ``dst`` in one atomic step; ``False`` where unsupported."""
    func = _renameat2()
    if func is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # e.g. NFS, or an old kernel: fall back to two renames
    if code == errno.ENOENT:
        raise FileNotFoundError(code, os.strerror(code), dst)
    raise OSError(code, os.strerror(code), dst)


def publish(src: str, dst: str, overwrite: bool) -> str | None:
    """Move the directory ``src`` to ``dst``; return where a replaced ``dst`` went.

    A missing ``dst`` is created by one rename. An existing one is swapped
    with ``src`` atomically where the kernel can (``renameat2`` with
    ``RENAME_EXCHANGE``: ext4, xfs, btrfs, tmpfs); elsewhere it is renamed
    aside first, so that for a moment ``dst`` is missing. The caller removes
    the returned path, which then holds the old content.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    while True:
        try:
            # a node directory is never empty, so rename refuses to replace one
            os.rename(src, dst)
            return None
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if not overwrite:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        try:
            if _exchange(src, dst):
                return src
        except FileNotFoundError:
            continue  # dst vanished meanwhile: try the plain rename again
        aside = f"{src}.old"
        try:
            os.rename(dst, aside)
        except FileNotFoundError:
            continue
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(aside)
            continue  # another writer published in the gap: replace theirs
        return aside
