"""Reading numpy's ``.npy`` and ``.npz`` files without trusting them.

np.load believes a file's header: a header that declares 8 TiB makes it try to
allocate 8 TiB, a damaged file surfaces as ``EOFError``, ``BadZipFile`` or a
message about pickle. Here every header is parsed first and the data it
declares is checked against the bytes that really follow it; only then does
numpy read the array. Damage is reported as
:class:`~polystore.exceptions.CorruptFileError`, naming the file.
"""

from __future__ import annotations

import io
import math
import os
from typing import IO, Any

import numpy as np

from .exceptions import CorruptFileError, UnsupportedFormatError

__all__ = ["check_npy_header", "read_npy", "read_npz", "refuse_pickle"]


def refuse_pickle(path: str) -> UnsupportedFormatError:
    """The error for an object array (pickle) that the caller did not allow."""
    return UnsupportedFormatError(
        path,
        reason="object arrays are stored with pickle, which polystore never runs by "
        "default; pass allow_pickle=True if you trust the data",
    )


#: what numpy's header parsing raises for a damaged or crafted header
_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, EOFError, RecursionError)
#: what reading checked data may still raise when the file changes under us
_DATA_ERRORS = (ValueError, EOFError)
#: deflate expands at most 1032-fold; a zip member claiming more is lying
_DEFLATE_MAX_RATIO = 1032


def _stream_size(stream: IO[bytes]) -> int | None:
    """The size of what ``stream`` reads from, when it can be told without reading it."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return end


def check_npy_header(
    stream: IO[bytes], path: str, size: int | None, allow_pickle: bool = False
) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Read the header of the ``.npy`` data at the stream's position and vouch for it.

    ``size`` is the size of the whole stream (for a zip member, its
    uncompressed size). The header is parsed without trusting it: the data it
    declares must fit in what follows it, so nothing is allocated for data
    that is not there. The stream is left just after the header.

    Raises:
        CorruptFileError: not ``.npy`` data, a header that does not parse, or
            one that declares more data than follows it.
        UnsupportedFormatError: the array holds objects (pickle) and
            ``allow_pickle`` is false.
    """
    from numpy.lib import format as npf

    start = stream.tell()
    if size is not None and size <= start:
        raise CorruptFileError(path, "the file is empty")
    # A trusted file may carry a header of any length, as np.load allows.
    limit = 1 << 62 if allow_pickle else 10_000
    try:
        version = npf.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npf.read_array_header_1_0(stream, max_header_size=limit)
        elif version in ((2, 0), (3, 0)):
            # Version 3 only differs in reading the header as UTF-8, which
            # changes field names at most, not the shape or the item size.
            shape, _, dtype = npf.read_array_header_2_0(stream, max_header_size=limit)
        else:
            raise ValueError(f".npy format version {version} is not one numpy writes")
    except _HEADER_ERRORS as exc:
        raise CorruptFileError(path, f"not a readable .npy file ({exc})") from exc
    if any(n < 0 for n in shape):
        raise CorruptFileError(path, f"the header declares a negative shape {shape}")
    if dtype.hasobject:
        if not allow_pickle:
            raise refuse_pickle(path)
        return shape, dtype  # pickled data has no size to check in advance
    needed = math.prod(shape) * dtype.itemsize
    left = None if size is None else size - stream.tell()
    if left is not None and needed > left:
        raise CorruptFileError(
            path,
            f"the header declares a {dtype} array of shape {shape} ({needed} bytes), "
            f"but only {left} bytes of data follow it (truncated or crafted)",
        )
    return shape, dtype


def read_npy(stream: IO[bytes], path: str, allow_pickle: bool) -> Any:
    """Read a ``.npy`` array from ``stream``, once its header is vouched for."""
    return _read_npy(stream, path, _stream_size(stream), allow_pickle)


def _read_npy(stream: IO[bytes], path: str, size: int | None, allow_pickle: bool) -> Any:
    import pickle

    from numpy.lib import format as npf

    if size is None:
        # Nothing tells how much is there: take what is, which bounds the array.
        stream = io.BytesIO(stream.read())
        size = len(stream.getbuffer())
    start = stream.tell()
    check_npy_header(stream, path, size, allow_pickle)
    stream.seek(start)
    try:
        return npf.read_array(stream, allow_pickle=allow_pickle, max_header_size=1 << 62)
    except (*_DATA_ERRORS, pickle.UnpicklingError) as exc:
        raise CorruptFileError(path, f"the array data cannot be read ({exc})") from exc


def read_npz(stream: IO[bytes], path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Read a ``.npz`` archive as a dict, checking each member before reading it."""
    import zipfile

    size = _stream_size(stream)
    if size == 0:
        raise CorruptFileError(path, "the file is empty")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                key = _member_key(info, path, size)
                with archive.open(info) as member:
                    try:
                        out[key] = _read_npy(member, path, info.file_size, allow_pickle)
                    except CorruptFileError as exc:
                        reason = f"member {info.filename!r}: {exc.reason}"
                        raise CorruptFileError(path, reason) from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise CorruptFileError(path, f"not a readable .npz archive ({exc})") from exc
    return out


def _member_key(info: Any, path: str, size: int | None) -> str:
    """The dict key of an archive member, once its sizes are plausible."""
    import zipfile

    name: str = info.filename
    if not name.endswith(".npy"):
        raise CorruptFileError(path, f"member {name!r} is not a .npy array")
    stored = info.compress_type == zipfile.ZIP_STORED
    if (
        (size is not None and info.compress_size > size)
        or (stored and info.file_size != info.compress_size)
        or info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 64
    ):
        raise CorruptFileError(
            path,
            f"member {name!r} claims {info.file_size} bytes from {info.compress_size} "
            "stored, more than its compression can give",
        )
    return name[: -len(".npy")]
