"""The disk backend: files in a directory tree, safe to share between processes.

Atomic writes
-------------
Every write goes to a new temporary file in the target's directory, is
flushed, and is renamed onto the target with :func:`os.replace`: a reader sees
the old file or the new one, never a torn one, even if the writer is killed
mid-write. ``overwrite=False`` hard-links the finished file to the target
instead, which fails if the target appeared meanwhile, so of two writers
exactly one wins. ``fsync=True`` (per backend or per call; off by default)
also forces the file to stable storage before the rename and the directory
after it, so the write survives a power loss, at the cost of waiting for the
device.

Reserved names, metadata and leftovers
--------------------------------------
polystore's own files start with ``.polystore-`` (listed in
:mod:`polystore.locks`); they never appear in listings, and paths using the
prefix are refused with :class:`~polystore.exceptions.ReservedNameError`.
Metadata lives in one sidecar per file, ``.polystore-meta-<name>.json``, so
processes saving different files into one directory never share a metadata
file. A file and its sidecar are committed under the directory's commit lock,
held for microseconds, so concurrent saves of one path leave a file with its
own metadata; and they are committed together (see :mod:`polystore._sidecar`),
so a writer killed at any step leaves the old file with its old metadata or
the new with the new. A killed writer's temporary
file stays (unlisted) until :meth:`DiskBackend.cleanup`, which
:meth:`DiskBackend.ensure_directory` runs on a directory that already exists.

Sandbox
-------
With ``root``, relative paths are taken inside ``root`` and absolute paths must
lie in it. Each path is resolved with :func:`os.path.realpath` (``..`` and
symbolic links included) and refused with
:class:`~polystore.exceptions.SandboxError`, a ``PermissionError``, if it ends
up outside; listings leave out links that lead outside. This guards against
paths taken from user input, not against a local user swapping directories for
links while a call runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, Literal

import numpy as np

from . import _sidecar
from ._args import check_timeout
from ._atomic import TEMP_PREFIX, fsync_dir, link_new, remove_quietly, write_temp
from .base import Kind, StatResult, StorageBackend, check_link_names
from .exceptions import (
    CorruptFileError,
    MetadataNotFoundError,
    ReservedNameError,
    SandboxError,
    UnsupportedFormatError,
    os_error,
)
from .formats import (
    Format,
    FormatRegistry,
    NpyFormat,
    array_spec,
    check_npy_header,
    default_formats,
    normalize_metadata,
    npy_header,
)
from .locks import (
    META_PREFIX,
    RESERVED_PREFIX,
    STALE_AFTER,
    directory_lock,
    file_lock,
    is_reserved,
    remove_stale,
    reserved_name,
)
from .paths import PathArg, as_str, in_root, is_inside, join_listing

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DiskBackend"]

#: seconds a save waits for a directory's commit lock, which is held for microseconds
DEFAULT_LOCK_TIMEOUT = 60.0


def _prepare(fmt: Format, data: Any, path: str, kwargs: dict[str, Any]) -> Any:
    """Validate ``data`` for ``fmt`` before anything is written."""
    if type(fmt) is NpyFormat:
        # np.save writes the caller's array straight from its memory: the copy
        # that Format.normalize makes for in-memory backends is not needed here.
        arr = np.asarray(data)
        fmt.check_load(arr, path, **kwargs)
        return arr
    return fmt.normalize(data, path, **kwargs)


def _place(
    source: str,
    target: str,
    sidecar: str,
    meta: dict[str, Any] | None,
    text: str,
    overwrite: bool,
    durable: bool,
) -> None:
    """Rename ``source`` onto ``target`` with its metadata, as :mod:`polystore._sidecar` commits.

    The caller holds the target directory's commit lock. If the rename fails,
    the sidecar's entries are put back as they were.
    """
    kept = _sidecar.stage(target, sidecar, source, meta, text, durable)
    try:
        if overwrite:
            os.replace(source, target)
        else:
            link_new(source, target, text)
    except BaseException:
        _sidecar.write_entries(sidecar, kept, durable)
        raise
    _sidecar.finish(target, sidecar, meta, durable)


class DiskBackend(StorageBackend):
    """Files on a local or shared file system, written atomically.

    Args:
        root: directory that relative paths are resolved in and that no path
            may leave. ``None`` uses paths as given (relative to the current
            directory), without a sandbox.
        formats: the formats to accept; defaults to
            :func:`~polystore.formats.default_formats`.
        fsync: force every write to stable storage before it becomes visible.
            Off by default: an atomic rename already protects against killed
            processes; ``fsync`` adds protection against power loss.
        lock_timeout: seconds to wait for a directory's commit lock before
            raising :class:`~polystore.exceptions.LockTimeoutError`; ``None``
            waits as long as it takes.

    Loading never unpickles unless ``allow_pickle=True`` is passed. ``.npy``
    files also load memory-mapped with ``mmap_mode="r"`` (or ``"r+"``, ``"c"``).
    The backend pickles by its configuration, so workers can receive it.
    """

    name = "disk"
    save_options: frozenset[str] | None = frozenset({"fsync"})
    load_options: frozenset[str] | None = frozenset({"mmap_mode"})

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        formats: FormatRegistry | None = None,
        fsync: bool = False,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.root = None if root is None else os.path.realpath(as_str(root, "root"))
        self.formats = formats if formats is not None else default_formats()
        self.fsync = bool(fsync)
        self.lock_timeout = check_timeout(lock_timeout, "lock_timeout")

    def __repr__(self) -> str:
        return f"DiskBackend(root={self.root!r})"

    @property
    def extensions(self) -> frozenset[str]:
        return frozenset(self.formats)

    # -- paths --------------------------------------------------------------
    def resolve(self, path: str | os.PathLike[str]) -> str:
        """The operating-system path that ``path`` names, after the sandbox check.

        Raises:
            SandboxError: ``path`` resolves outside ``root``.
            ReservedNameError: ``path`` uses polystore's reserved prefix.
        """
        return self._resolve(as_str(path))

    def _resolve(self, text: str) -> str:
        if RESERVED_PREFIX in text:
            parts = text.replace(os.sep, "/").split("/")
            if any(is_reserved(part) for part in parts):
                raise ReservedNameError(text, RESERVED_PREFIX)
        return text if self.root is None else in_root(self.root, text)

    def _resolve_entry(self, text: str) -> str:
        """Like :meth:`_resolve`, but a link in the last name is not followed.

        This is the path an operation on the entry itself (``delete``) acts
        on: the parent is resolved and checked against the sandbox, the last
        name is taken as it is, as ``unlink`` and ``rm`` take it.
        """
        stripped = text.rstrip("/" + os.sep) or text
        head, name = os.path.split(stripped)
        if name in ("", ".", ".."):
            return self._resolve(text)
        if is_reserved(name):
            raise ReservedNameError(text, RESERVED_PREFIX)
        if self.root is None:
            return stripped
        return os.path.join(self._resolve(head or "."), name)

    def _visible(self, entry: os.DirEntry[str]) -> bool:
        """Whether a directory entry belongs in a listing."""
        if is_reserved(entry.name):
            return False
        if self.root is None or not entry.is_symlink():
            return True
        return is_inside(self.root, os.path.realpath(entry.path))

    @staticmethod
    def _sidecar(target: str) -> str:
        directory, name = os.path.split(target)
        return os.path.join(directory, reserved_name(META_PREFIX, name, ".json"))

    @staticmethod
    def _missing_or_not_dir(exc: NotADirectoryError, target: str, text: str) -> OSError:
        """ENOTDIR means a file among the parents (missing) unless ``target`` is a file."""
        if os.path.isfile(target):
            return exc
        return os_error(FileNotFoundError, text)

    # -- writing --------------------------------------------------------------
    @staticmethod
    def _kind_of(target: str) -> Kind | None:
        try:
            st = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return "dir" if stat.S_ISDIR(st.st_mode) else "file"

    def _check_target(self, target: str, text: str, overwrite: bool) -> None:
        """Refuse early, before writing, what the commit would refuse anyway."""
        kind = self._kind_of(target)
        if kind == "dir":
            raise os_error(IsADirectoryError, text)
        if kind == "file" and not overwrite:
            raise os_error(FileExistsError, text)

    def _write_and_commit(
        self,
        target: str,
        text: str,
        writer: Callable[[IO[bytes]], object],
        meta: dict[str, Any] | None,
        overwrite: bool,
        durable: bool,
    ) -> None:
        """Write ``target`` to a temporary file, then commit it with its metadata.

        The commit follows :mod:`polystore._sidecar`: a writer killed at any
        point leaves the old file with its old metadata or the new with the new.
        """
        tmp = write_temp(os.path.dirname(target), writer, fsync=durable)
        self._commit(tmp, target, text, meta, overwrite, durable)

    def _commit(
        self,
        tmp: str,
        target: str,
        text: str,
        meta: dict[str, Any] | None,
        overwrite: bool,
        durable: bool,
    ) -> None:
        """Move the finished temporary file ``tmp`` onto ``target`` with its metadata."""
        try:  # (from its first line: a signal handler's exception removes tmp too)
            directory = os.path.dirname(target)
            sidecar = self._sidecar(target)
            with directory_lock(directory, self.lock_timeout):
                _place(tmp, target, sidecar, meta, text, overwrite, durable)
        except BaseException:
            remove_quietly(tmp)
            raise
        if durable:
            fsync_dir(directory)

    # -- primitives -------------------------------------------------------------
    def save(
        self,
        data: Any,
        path: PathArg,
        *,
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        fsync: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Store ``data`` at ``path`` atomically (see the module notes).

        ``fsync`` overrides the backend's setting for this call; other keyword
        arguments reach the format (``allow_pickle``, ``compressed`` for
        ``.npz``, ``indent`` for ``.json``).
        """
        text = as_str(path)
        target = self._resolve(text)
        fmt = self.formats.for_path(text)
        if kwargs:
            self._check_options(kwargs, fmt.save_options, "save", text)
        value = _prepare(fmt, data, text, kwargs)
        meta = normalize_metadata(metadata, text)
        self._check_target(target, text, overwrite)
        durable = self.fsync if fsync is None else bool(fsync)
        self._write_and_commit(
            target, text, lambda f: fmt.write(f, value, **kwargs), meta, overwrite, durable
        )

    @contextlib.contextmanager
    def create_array(
        self,
        path: PathArg,
        shape: int | Sequence[int],
        dtype: Any = float,
        *,
        order: Literal["C", "F"] = "C",
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        fsync: bool | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """A ``.npy`` file filled in place through a memory map (see the base class).

        The array maps a new hidden file beside the target, backed by disk
        space reserved up front (a full disk fails here, not as SIGBUS
        later); on success it is flushed and renamed onto ``path`` with its
        metadata, atomically like :meth:`save`. Other formats are made in
        memory and saved at the end.
        """
        text = as_str(path)
        target = self._resolve(text)
        spec = array_spec(shape, dtype, order)
        self._check_new_file(path, overwrite)
        fmt = self.formats.for_path(text)
        if type(fmt) is not NpyFormat or kwargs or spec.nbytes == 0:
            with super().create_array(
                path, shape, dtype, order=order, overwrite=overwrite, metadata=metadata,
                fsync=fsync, **kwargs,
            ) as arr:  # fmt: skip
                yield arr
            return
        meta = normalize_metadata(metadata, text)
        self._check_target(target, text, overwrite)
        durable = self.fsync if fsync is None else bool(fsync)
        header = npy_header(spec)
        size = len(header) + spec.nbytes

        def reserve(f: IO[bytes]) -> None:
            f.write(header)
            f.flush()
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(f.fileno(), size)  # no reservation on this file system

        tmp = write_temp(os.path.dirname(target), reserve)
        try:
            arr = np.memmap(
                tmp, spec.dtype, mode="r+", offset=len(header), shape=spec.shape, order=spec.order
            )
            try:
                yield arr
                arr.flush()
            finally:
                arr.flags.writeable = False
            if durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        except BaseException:
            remove_quietly(tmp)
            raise
        self._commit(tmp, target, text, meta, overwrite, durable)

    def load(self, path: PathArg, **kwargs: Any) -> Any:
        text = as_str(path)
        source = self._resolve(text)
        try:
            fmt = self.formats.for_path(text)
        except UnsupportedFormatError:
            # a directory is reported as one, whatever its name
            if self._kind_of(source) == "dir":
                raise os_error(IsADirectoryError, text) from None
            raise
        if kwargs:
            self._check_options(kwargs, fmt.load_options, "load", text)
        mmap_mode = kwargs.pop("mmap_mode", None)
        if mmap_mode is not None and (type(fmt) is not NpyFormat or mmap_mode == "w+"):
            raise UnsupportedFormatError(text, reason="mmap_mode 'r', 'r+' or 'c' needs .npy")
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below, after the error mapping
        except NotADirectoryError as exc:
            raise self._missing_or_not_dir(exc, source, text) from None
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise os_error(type(exc), text) from None
        with f:
            if mmap_mode is None:
                return fmt.read(f, text, **kwargs)
            check_npy_header(f, text, os.fstat(f.fileno()).st_size)
        try:
            # A mapping keeps the file it opened, whatever later replaces the path.
            return np.load(source, mmap_mode=mmap_mode, allow_pickle=False)
        except ValueError as exc:  # the file changed since its header was checked
            raise CorruptFileError(text, f"cannot map the array data ({exc})") from exc

    def kind(self, path: PathArg) -> Kind | None:
        return self._kind_of(self._resolve(as_str(path)))

    def _scandir(self, directory: str, text: str) -> os._ScandirIterator[str]:
        try:
            return os.scandir(directory)
        except NotADirectoryError as exc:
            raise self._missing_or_not_dir(exc, directory, text) from None

    def list_dir(self, path: PathArg) -> list[str]:
        text = as_str(path)
        with self._scandir(self._resolve(text), text) as entries:
            return sorted(e.name for e in entries if self._visible(e))

    def _walk_files(self, directory: str, recursive: bool) -> Iterable[str]:
        top = self._resolve(directory)
        found: list[str] = []
        with self._scandir(top, directory) as entries:
            pending = self._sort_entries(entries, "", found, recursive)
        while pending:
            rel_dir, full = pending.pop()
            try:
                sub = os.scandir(full)
            except FileNotFoundError:
                continue  # removed while we were walking
            with sub:
                pending.extend(self._sort_entries(sub, rel_dir + "/", found, recursive))
        return found

    def _sort_entries(
        self, entries: Iterator[os.DirEntry[str]], rel_dir: str, found: list[str], recursive: bool
    ) -> list[tuple[str, str]]:
        """Add files to ``found``; return the subdirectories to walk."""
        subdirs = []
        for entry in entries:
            if not self._visible(entry):
                continue
            if entry.is_file():
                found.append(rel_dir + entry.name)
            elif recursive and entry.is_dir(follow_symlinks=False):
                # Links to directories are not followed: they could form cycles.
                subdirs.append((rel_dir + entry.name, entry.path))
        return subdirs

    def ensure_directory(self, path: PathArg) -> str:
        """Create ``path`` and its parents if missing; return ``path`` as ``str``.

        On a directory that already existed, also removes what killed writers
        left in it (see :meth:`cleanup`).
        """
        text = as_str(path)
        target = self._resolve(text)
        existed = os.path.isdir(target)
        try:
            os.makedirs(target, exist_ok=True)
        except FileExistsError:
            raise os_error(FileExistsError, text, "a file is in the way") from None
        if existed:
            remove_stale(target, STALE_AFTER, self.lock_timeout)
        return text

    def delete(self, path: PathArg, recursive: bool = False) -> None:
        """Remove a file or directory; a symbolic link is removed, never what it points to.

        ``recursive=True`` removes links found inside the directory the same way.
        """
        text = as_str(path)
        target = self._resolve_entry(text)
        if self.root is not None and target == self.root:
            raise SandboxError(text, self.root)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise os_error(FileNotFoundError, text) from None
        except NotADirectoryError:
            raise os_error(NotADirectoryError, text) from None
        if not stat.S_ISDIR(st.st_mode):
            with directory_lock(os.path.dirname(target), self.lock_timeout):
                try:
                    os.unlink(target)
                except FileNotFoundError:
                    raise os_error(FileNotFoundError, text) from None
                # after the file: a writer killed between the two leaves an
                # orphan sidecar, which cleanup removes, not a file without metadata
                remove_quietly(self._sidecar(target))
        elif recursive:
            shutil.rmtree(target)
        else:
            self._rmdir(target, text)

    # -- links and stat ----------------------------------------------------------
    supports_symlinks = True

    def create_symlink(self, source: PathArg, link: PathArg, *, overwrite: bool = False) -> None:
        """A relative link, so the tree can move; ``source`` may be a directory.

        With ``root``, both ``source`` and the link must lie inside it
        (:class:`~polystore.exceptions.SandboxError` otherwise). ``overwrite``
        swaps the old link for the new in one rename.
        """
        src_text, link_text = as_str(source), as_str(link)
        check_link_names(src_text, link_text)
        src, entry = self._resolve(src_text), self._resolve_entry(link_text)
        if self._kind_of(src) is None:
            raise os_error(FileNotFoundError, src_text)
        parent = os.path.dirname(entry) or "."
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise os_error(NotADirectoryError, link_text) from None
        relative = os.path.relpath(src, parent)
        if overwrite and os.path.islink(entry):
            tmp = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
            os.symlink(relative, tmp)
            os.replace(tmp, entry)
            return
        try:
            os.symlink(relative, entry)
        except FileExistsError:
            raise os_error(FileExistsError, link_text) from None

    def is_symlink(self, path: PathArg) -> bool:
        return os.path.islink(self._resolve_entry(as_str(path)))

    def stat(self, path: PathArg) -> StatResult:
        text = as_str(path)
        try:
            st = os.stat(self._resolve(text))
        except (FileNotFoundError, NotADirectoryError):
            raise os_error(FileNotFoundError, text) from None
        if stat.S_ISDIR(st.st_mode):
            return StatResult("dir", None, st.st_mtime, self.is_symlink(text))
        return StatResult("file", st.st_size, st.st_mtime, self.is_symlink(text))

    @staticmethod
    def _rmdir(target: str, text: str) -> None:
        """Remove a directory that holds nothing but polystore's own files."""
        try:
            os.rmdir(target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        names = os.listdir(target)
        if not all(is_reserved(name) for name in names):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), text)
        for name in names:
            remove_quietly(os.path.join(target, name))
        os.rmdir(target)

    # -- copy and move ---------------------------------------------------------
    def _same_format(self, src: str, dst: str) -> bool:
        return self.formats.for_path(src) == self.formats.for_path(dst)

    def _require_file(self, source: str, text: str) -> None:
        kind = self._kind_of(source)
        if kind != "file":
            raise os_error(IsADirectoryError if kind else FileNotFoundError, text)

    def _metadata_of(self, target: str, text: str) -> dict[str, Any] | None:
        return _sidecar.metadata_of(target, self._sidecar(target), text)

    def copy(self, src: PathArg, dst: PathArg, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Copy the file ``src`` to ``dst`` with its metadata, byte for byte.

        The copy keeps the permission bits and modification time of ``src``. Between
        different formats, the value is loaded and saved in the new format.
        """
        src_text, dst_text = as_str(src), as_str(dst)
        source, target = self._resolve(src_text), self._resolve(dst_text)
        if self._kind_of(source) == "dir":  # before the names are asked for a format
            raise os_error(IsADirectoryError, src_text)
        if not self._same_format(src_text, dst_text):
            super().copy(src, dst, overwrite=overwrite, **kwargs)
            return
        self._require_file(source, src_text)
        self._check_target(target, dst_text, overwrite)
        durable = self.fsync if kwargs.get("fsync") is None else bool(kwargs["fsync"])

        def writer(f: IO[bytes]) -> None:
            with open(source, "rb") as fsrc:
                shutil.copyfileobj(fsrc, f, 1 << 20)
            f.flush()  # before copying the times, or the last write would change them
            st = os.stat(source)
            os.chmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(f.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))

        meta = self._metadata_of(source, src_text)
        self._write_and_commit(target, dst_text, writer, meta, overwrite, durable)

    def move(self, src: PathArg, dst: PathArg, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Move the file ``src`` to ``dst`` with its metadata, by renaming it when possible."""
        src_text, dst_text = as_str(src), as_str(dst)
        source, target = self._resolve(src_text), self._resolve(dst_text)
        if self._kind_of(source) == "dir":  # before the names are asked for a format
            raise os_error(IsADirectoryError, src_text)
        if not self._same_format(src_text, dst_text):
            super().move(src, dst, overwrite=overwrite, **kwargs)
            return
        self._require_file(source, src_text)
        self._check_target(target, dst_text, overwrite)
        if source == target:
            return
        parent = os.path.dirname(target)
        try:
            os.makedirs(parent or ".", exist_ok=True)
        except FileExistsError:
            raise os_error(NotADirectoryError, dst_text) from None
        try:
            with self._directory_locks(os.path.dirname(source), parent):
                self._rename(source, target, dst_text, overwrite)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Different file systems: no rename can do it.
            self.copy(src, dst, overwrite=overwrite, **kwargs)
            self.delete(src)

    def _directory_locks(self, *directories: str) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        # A fixed order, so two moves in opposite directions cannot deadlock.
        for directory in sorted(set(directories)):
            stack.enter_context(directory_lock(directory, self.lock_timeout))
        return stack

    def _rename(self, source: str, target: str, dst_text: str, overwrite: bool) -> None:
        """Rename a file with its metadata (both directories' commit locks held)."""
        src_meta, dst_meta = self._sidecar(source), self._sidecar(target)
        meta = _sidecar.metadata_of(source, src_meta, dst_text)
        durable = self.fsync
        # A rename keeps the file's identity, so its entry is valid at the new name.
        _place(source, target, dst_meta, meta, dst_text, overwrite, durable)
        remove_quietly(src_meta)

    # -- metadata, locks, cleanup ---------------------------------------------
    def load_metadata(self, path: PathArg) -> dict[str, Any]:
        text = as_str(path)
        target = self._resolve(text)
        meta = self._metadata_of(target, text) if os.path.isfile(target) else None
        if meta is None:
            raise MetadataNotFoundError(text)
        return meta

    def lock(
        self, path: PathArg, timeout: float | None = None, shared: bool = False
    ) -> contextlib.AbstractContextManager[str]:
        """:func:`~polystore.file_lock` on ``path`` inside this backend's root."""
        return file_lock(self._resolve(as_str(path)), timeout=timeout, shared=shared)

    def cleanup(
        self, directory: PathArg = ".", *, recursive: bool = True, max_age: float = STALE_AFTER
    ) -> list[str]:
        """Remove what killed processes left behind; return the removed paths.

        Removes temporary files whose writer is no longer running and that
        have not been written for ``max_age`` seconds, lock files nobody
        holds, and metadata whose data file no longer exists. Live writers'
        files are never touched. Metadata that a killed writer left with the
        entries of two versions keeps only the entry of the file that is
        there (it is not counted as removed).
        """
        text = as_str(directory, "directory")
        top = self._resolve(text)
        removed: list[str] = []
        pending = [("", top)]
        while pending:
            rel_dir, full = pending.pop()
            names = remove_stale(full, max_age, self.lock_timeout)
            removed.extend(rel_dir + name for name in names)
            _sidecar.settle(full, self.lock_timeout)
            if recursive:
                with os.scandir(full) as entries:
                    pending.extend(
                        (rel_dir + e.name + "/", e.path)
                        for e in entries
                        if not is_reserved(e.name) and e.is_dir(follow_symlinks=False)
                    )
        return join_listing(text, removed)
