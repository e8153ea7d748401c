"""File formats, chosen by a path's extension.

A :class:`Format` knows three things about one kind of value: how to check and
copy it (:meth:`Format.normalize`, used by every backend before storing), how to
write it to a binary stream and how to read it back. In-memory backends keep
the normalised value, so a value loads back as the same type from every
backend: a tuple saved as ``.json`` loads as a list everywhere, as it would
from a file.

Backends take a :class:`FormatRegistry`; :func:`default_formats` returns a fresh
copy of the built-in one, which a user may extend and hand to a backend.
"""

from __future__ import annotations

import io
import math
import operator
from collections.abc import Iterator, Mapping
from typing import IO, Any, Literal, NamedTuple

import numpy as np

from ._npyio import check_npy_header, read_npy, read_npz, refuse_pickle
from .exceptions import CorruptFileError, UnsupportedFormatError
from .paths import split_ext

__all__ = [
    "ArraySpec",
    "BytesFormat",
    "Format",
    "FormatRegistry",
    "JsonFormat",
    "NpyFormat",
    "NpzFormat",
    "TextFormat",
    "TiffFormat",
    "array_spec",
    "check_npy_header",
    "default_formats",
    "normalize_metadata",
    "npy_header",
    "parse_metadata",
]


class ArraySpec(NamedTuple):
    """A checked description of an array to be made: shape, dtype, memory order."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: Literal["C", "F"]

    @property
    def nbytes(self) -> int:
        """Bytes of the array's data."""
        return math.prod(self.shape) * self.dtype.itemsize


def array_spec(shape: object, dtype: object, order: object = "C") -> ArraySpec:
    """Check what ``create_array`` is asked for, before anything is allocated.

    Raises:
        TypeError: ``shape`` is not an int or a sequence of ints, ``dtype`` is
            not a dtype, or it holds Python objects (which no backend can
            write in place).
        ValueError: a negative size, or ``order`` not "C" or "F".
    """
    # No generator expressions: this runs for every array made in place, with
    # the caches cold from the last one (benchmarks/pipeline.py).
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    try:
        sizes = tuple([operator.index(d) for d in dims])
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if sizes and min(sizes) < 0:
        raise ValueError(f"negative size in shape {sizes}")
    dt: np.dtype[Any] = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)  # type: ignore[call-overload]
    if dt.hasobject:
        raise TypeError(f"arrays of dtype {dt} hold Python objects; they cannot be made in place")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    return ArraySpec(sizes, dt, "F" if order == "F" else "C")


def npy_header(spec: ArraySpec) -> bytes:
    """The ``.npy`` header of an array described by ``spec`` (its data follows it)."""
    from numpy.lib import format as npformat

    header = {
        "descr": npformat.dtype_to_descr(spec.dtype),
        "fortran_order": spec.order == "F" and len(spec.shape) > 1,
        "shape": spec.shape,
    }
    buf = io.BytesIO()
    try:
        npformat.write_array_header_1_0(buf, header)
    except ValueError:  # too long for version 1.0
        buf = io.BytesIO()
        npformat.write_array_header_2_0(buf, header)
    return buf.getvalue()


class Format:
    """One kind of stored value. Subclasses set ``name`` and ``extensions``.

    ``save_options`` and ``load_options`` name the keyword options its
    ``normalize``/``write`` and its ``read`` take, besides ``allow_pickle``,
    which every format takes (where nothing is pickled it changes nothing).
    The backends refuse any other option with ``TypeError``, so a misspelt
    one (``metdata=``) is not silently dropped. ``None`` (the default, for a
    format of your own) declares nothing, and every option is passed on.
    """

    name: str = ""
    extensions: tuple[str, ...] = ()
    save_options: frozenset[str] | None = None
    load_options: frozenset[str] | None = None

    def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
        """Check ``data`` and return a private copy of it in its loaded form.

        Array formats accept ``copy=False`` from callers that copy the value
        into storage themselves; they then return the input when it is an array.
        """
        raise NotImplementedError

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        """Write a normalised value to a binary stream."""
        raise NotImplementedError

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        """Read a value back from a binary stream."""
        raise NotImplementedError

    def check_load(self, value: Any, path: str, **kwargs: Any) -> None:
        """Refuse to hand out a stored value the caller did not allow (default: accept)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class NpyFormat(Format):
    """A single numpy array (``.npy``). Object arrays need ``allow_pickle=True``."""

    name = "npy"
    extensions = (".npy",)
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset()

    def normalize(
        self, data: Any, path: str, allow_pickle: bool = False, copy: bool = True, **kwargs: Any
    ) -> Any:
        # copy=False is for callers that copy the array into storage themselves.
        arr = np.array(data, copy=True, order="C") if copy else np.asarray(data)
        if arr.dtype.hasobject and not allow_pickle:
            raise refuse_pickle(path)
        return arr

    def write(
        self, stream: IO[bytes], value: Any, allow_pickle: bool = False, **kwargs: Any
    ) -> None:
        np.save(stream, value, allow_pickle=allow_pickle)

    def read(self, stream: IO[bytes], path: str, allow_pickle: bool = False, **kwargs: Any) -> Any:
        return read_npy(stream, path, allow_pickle)

    def check_load(self, value: Any, path: str, allow_pickle: bool = False, **kwargs: Any) -> None:
        if isinstance(value, np.ndarray) and value.dtype.hasobject and not allow_pickle:
            raise refuse_pickle(path)


class NpzFormat(Format):
    """A mapping of names to arrays (``.npz``); loads as a ``dict``."""

    name = "npz"
    extensions = (".npz",)
    save_options: frozenset[str] | None = frozenset({"compressed"})
    load_options: frozenset[str] | None = frozenset()

    def normalize(
        self, data: Any, path: str, allow_pickle: bool = False, copy: bool = True, **kwargs: Any
    ) -> Any:
        if not isinstance(data, Mapping):
            raise UnsupportedFormatError(
                path, reason=f".npz stores a mapping of names to arrays, got {type(data).__name__}"
            )
        out: dict[str, np.ndarray] = {}
        for key, item in data.items():
            if not isinstance(key, str):
                raise UnsupportedFormatError(path, reason=f".npz keys must be str, got {key!r}")
            arr = np.array(item, copy=True, order="C") if copy else np.asarray(item)
            if arr.dtype.hasobject and not allow_pickle:
                raise refuse_pickle(path)
            out[key] = arr
        return out

    def write(
        self,
        stream: IO[bytes],
        value: Any,
        compressed: bool = False,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        saver = np.savez_compressed if compressed else np.savez
        saver(stream, allow_pickle=allow_pickle, **value)

    def read(self, stream: IO[bytes], path: str, allow_pickle: bool = False, **kwargs: Any) -> Any:
        return read_npz(stream, path, allow_pickle)

    def check_load(self, value: Any, path: str, allow_pickle: bool = False, **kwargs: Any) -> None:
        if not allow_pickle and any(a.dtype.hasobject for a in value.values()):
            raise refuse_pickle(path)


class JsonFormat(Format):
    """Any JSON-serialisable value (``.json``); loads as JSON decodes it."""

    name = "json"
    extensions = (".json",)
    save_options: frozenset[str] | None = frozenset({"indent"})
    load_options: frozenset[str] | None = frozenset()

    def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
        try:
            import json  # deferred: keeps `import polystore` cheap

            return json.loads(json.dumps(data, allow_nan=True))
        except (TypeError, ValueError) as exc:
            reason = f"value is not JSON-serialisable: {exc}"
            raise UnsupportedFormatError(path, reason=reason) from exc
        except RecursionError as exc:
            raise UnsupportedFormatError(path, reason="value is nested too deeply") from exc

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        import json

        stream.write(json.dumps(value, indent=kwargs.get("indent")).encode("utf-8"))

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        return _decode_json(stream.read(), path, "")


def _decode_json(raw: bytes, path: str, what: str) -> Any:
    """Decode UTF-8 JSON; ``what`` says which part of the file it is, for the message."""
    import json

    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both
        raise CorruptFileError(path, f"{what}not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:
        raise CorruptFileError(path, f"{what}JSON nested too deeply to decode") from exc


class TextFormat(Format):
    """A ``str``, stored as UTF-8 (``.txt``)."""

    name = "txt"
    extensions = (".txt",)
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset()

    def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
        if not isinstance(data, str):
            raise UnsupportedFormatError(path, reason=f".txt stores str, got {type(data).__name__}")
        return data

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        stream.write(value.encode("utf-8"))

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        try:
            return stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFileError(path, f"not UTF-8 text ({exc})") from exc


class BytesFormat(Format):
    """Raw bytes (``.bin``, ``.raw``); any bytes-like value, loads as ``bytes``."""

    name = "bytes"
    extensions = (".bin", ".raw")
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset()

    def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
        if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise UnsupportedFormatError(
                path, reason=f"raw files store bytes-like values, got {type(data).__name__}"
            )
        return bytes(data)

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        stream.write(value)

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        return stream.read()


class TiffFormat(Format):
    """A numpy array as TIFF (``.tif``, ``.tiff``); needs the optional tifffile."""

    name = "tiff"
    extensions = (".tif", ".tiff")
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset()

    @staticmethod
    def _tifffile(path: str) -> Any:
        try:
            import tifffile
        except ImportError as exc:
            raise UnsupportedFormatError(
                path, reason="TIFF needs tifffile: pip install 'polystore[tiff]'"
            ) from exc
        return tifffile

    def normalize(self, data: Any, path: str, copy: bool = True, **kwargs: Any) -> Any:
        self._tifffile(path)
        arr = np.array(data, copy=True, order="C") if copy else np.asarray(data)
        if arr.dtype.hasobject:
            raise UnsupportedFormatError(path, reason="TIFF cannot store object arrays")
        return arr

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        self._tifffile("<stream>").imwrite(stream, value)

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        return self._tifffile(path).imread(stream)


class FormatRegistry(Mapping[str, Format]):
    """Extension -> :class:`Format`. Extensions are lower-case, with the dot."""

    def __init__(self, formats: tuple[Format, ...] = ()) -> None:
        self._by_ext: dict[str, Format] = {}
        for fmt in formats:
            self.register(fmt)

    def register(self, fmt: Format, *, replace: bool = False) -> None:
        """Add ``fmt`` for each of its extensions; an existing one needs ``replace=True``."""
        if not isinstance(fmt, Format):
            raise TypeError(f"expected a Format instance, got {type(fmt).__name__}")
        for ext in fmt.extensions:
            if not ext.startswith(".") or ext != ext.lower():
                raise ValueError(f"extensions are lower-case and start with a dot, got {ext!r}")
            if ext in self._by_ext and not replace:
                raise ValueError(
                    f"extension {ext!r} is already handled by {self._by_ext[ext]!r}; "
                    "pass replace=True to override it"
                )
        for ext in fmt.extensions:
            self._by_ext[ext] = fmt

    def for_path(self, path: str) -> Format:
        """The format of ``path``, by its extension."""
        ext = split_ext(path)
        try:
            return self._by_ext[ext]
        except KeyError:
            reason = "no extension" if not ext else f"unknown extension {ext!r}"
            raise UnsupportedFormatError(path, self._by_ext, reason) from None

    def copy(self) -> FormatRegistry:
        new = FormatRegistry()
        new._by_ext = dict(self._by_ext)
        return new

    def __getitem__(self, ext: str) -> Format:
        return self._by_ext[ext]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._by_ext))

    def __len__(self) -> int:
        return len(self._by_ext)

    def __repr__(self) -> str:
        return f"FormatRegistry({', '.join(self)})"


_BUILTIN = (NpyFormat(), NpzFormat(), JsonFormat(), TextFormat(), BytesFormat(), TiffFormat())


def default_formats() -> FormatRegistry:
    """A new registry holding the built-in formats."""
    from .formats_extra import CsvFormat, TorchFormat  # deferred: they import formats

    return FormatRegistry((*_BUILTIN, CsvFormat(), TorchFormat()))


def normalize_metadata(metadata: Any, path: str) -> dict[str, Any] | None:
    """Check that ``metadata`` is a JSON-serialisable dict; return a private copy.

    Every backend calls this before writing anything, so bad metadata never
    leaves a half-saved file behind.

    Raises:
        TypeError: ``metadata`` is not a dict.
        UnsupportedFormatError: it cannot be written as JSON (NaN and
            infinities included).
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    normalized: dict[str, Any] = JsonFormat().normalize(metadata, path)
    import json

    try:
        # NaN and infinities would be written as tokens that JSON does not have
        json.dumps(normalized, allow_nan=False)
    except ValueError as exc:
        raise UnsupportedFormatError(path, reason=f"metadata must be valid JSON: {exc}") from exc
    return normalized


def parse_metadata(raw: bytes, path: str) -> dict[str, Any]:
    """Decode stored metadata; ``path`` is the file it belongs to.

    Raises:
        CorruptFileError: the stored metadata is not a JSON object.
    """
    meta = _decode_json(raw, path, "its metadata is ")
    if not isinstance(meta, dict):
        raise CorruptFileError(
            path, f"its metadata is not a JSON object but a {type(meta).__name__}"
        )
    return meta
