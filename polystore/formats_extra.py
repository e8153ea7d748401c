"""Formats beyond numpy's: ``.csv`` tables and ``.pt``/``.pth`` torch tensors.

Both are in :func:`~polystore.formats.default_formats`. The csv module and
torch are imported the first time such a file is saved or loaded, never by
``import polystore``; without torch, a ``.pt`` file raises
:class:`~polystore.exceptions.MissingDependencyError` with the command that
installs it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from .exceptions import CorruptFileError, MissingDependencyError, UnsupportedFormatError
from .formats import Format

__all__ = ["CsvFormat", "TorchFormat"]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


class CsvFormat(Format):
    """A table (``.csv``): rows of dicts with a header, or a 2-d numeric array without one.

    Rows of dicts load as a list of dicts of ``str`` (csv has no types; a
    missing value is ``""``), with the keys of every row in the order first
    seen. A 2-d array of numbers loads as ``int64`` when it held integers
    (or booleans), else ``float64``. A file is read as an array when its
    first row is all numbers, so a header needs one name that is not a number.
    """

    name = "csv"
    extensions = (".csv",)
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset()

    def normalize(self, data: Any, path: str, **kwargs: Any) -> Any:
        if isinstance(data, np.ndarray):
            return self._table(data, path)
        rows = isinstance(data, Sequence) and not isinstance(data, (str, bytes))
        if rows and all(isinstance(row, Mapping) for row in data):
            return self._rows(data, path)
        raise UnsupportedFormatError(
            path,
            reason=f".csv stores a list of dicts or a 2-d numeric array, got {type(data).__name__}",
        )

    @staticmethod
    def _table(data: np.ndarray, path: str) -> np.ndarray:
        if data.ndim != 2 or data.size == 0:
            raise UnsupportedFormatError(
                path, reason=f".csv stores a non-empty 2-d array, got shape {data.shape}"
            )
        if data.dtype.kind in "biu":
            if data.dtype.kind == "u" and data.max() > np.iinfo(np.int64).max:
                raise UnsupportedFormatError(path, reason="values too large for int64")
            return data.astype(np.int64)
        if data.dtype.kind == "f":
            return data.astype(np.float64)
        raise UnsupportedFormatError(path, reason=f".csv arrays hold numbers, got {data.dtype}")

    @staticmethod
    def _rows(data: Sequence[Mapping[Any, Any]], path: str) -> list[dict[str, str]]:
        fields: dict[str, None] = {}
        for row in data:
            for key in row:
                if not isinstance(key, str):
                    raise UnsupportedFormatError(path, reason=f".csv column names are str: {key!r}")
                fields.setdefault(key)
        if fields and all(_is_number(name) for name in fields):
            raise UnsupportedFormatError(
                path, reason="a .csv header needs a column name that is not a number"
            )
        return [{k: "" if row.get(k) is None else str(row[k]) for k in fields} for row in data]

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        import csv

        text = io.StringIO(newline="")
        if isinstance(value, np.ndarray):
            csv.writer(text).writerows([[repr(x) for x in row] for row in value.tolist()])
        elif value:
            writer = csv.DictWriter(text, fieldnames=list(value[0]))
            writer.writeheader()
            writer.writerows(value)
        stream.write(text.getvalue().encode("utf-8"))

    def read(self, stream: IO[bytes], path: str, **kwargs: Any) -> Any:
        import csv

        try:
            text = stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFileError(path, f"not UTF-8 text ({exc})") from exc
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise CorruptFileError(path, f"not CSV ({exc})") from exc
        if not rows:
            return []
        if all(_is_number(cell) for cell in rows[0]):
            return self._read_table(rows, path)
        header, body = rows[0], rows[1:]
        if any(len(row) > len(header) for row in body):
            raise CorruptFileError(path, "a row has more values than the header has names")
        width = len(header)
        return [dict(zip(header, row + [""] * (width - len(row)), strict=True)) for row in body]

    @staticmethod
    def _read_table(rows: list[list[str]], path: str) -> np.ndarray:
        if any(len(row) != len(rows[0]) for row in rows):
            raise CorruptFileError(path, "the rows of a numeric table differ in length")
        try:
            if all(_is_int(cell) for row in rows for cell in row):
                return np.array([[int(c) for c in row] for row in rows], dtype=np.int64)
            return np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
        except (ValueError, OverflowError) as exc:
            raise CorruptFileError(
                path, f"a cell of a numeric table is not a number ({exc})"
            ) from exc


def _torch(path: str) -> Any:
    try:
        import torch  # type: ignore[import-not-found, unused-ignore]  # optional, may be absent
    except ImportError:
        raise MissingDependencyError("torch", "torch") from None
    return torch


class TorchFormat(Format):
    """A torch tensor, or a dict of them such as a ``state_dict`` (``.pt``, ``.pth``).

    Loading unpickles nothing but tensors and plain containers
    (``torch.load(weights_only=True)``) unless ``allow_pickle=True`` is
    passed; ``map_location`` is passed on (default ``"cpu"``).
    """

    name = "torch"
    extensions = (".pt", ".pth")
    save_options: frozenset[str] | None = frozenset()
    load_options: frozenset[str] | None = frozenset({"map_location"})

    def normalize(self, data: Any, path: str, copy: bool = True, **kwargs: Any) -> Any:
        torch = _torch(path)
        if isinstance(data, torch.Tensor):
            return data.detach().clone()
        if isinstance(data, Mapping) and all(isinstance(v, torch.Tensor) for v in data.values()):
            return {str(k): v.detach().clone() for k, v in data.items()}
        raise UnsupportedFormatError(
            path, reason=f".pt stores a tensor or a dict of tensors, got {type(data).__name__}"
        )

    def write(self, stream: IO[bytes], value: Any, **kwargs: Any) -> None:
        _torch("<stream>").save(value, stream)

    def read(self, stream: IO[bytes], path: str, allow_pickle: bool = False, **kwargs: Any) -> Any:
        torch = _torch(path)
        location = kwargs.get("map_location", "cpu")
        return torch.load(stream, map_location=location, weights_only=not allow_pickle)
