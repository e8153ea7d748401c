"""Keys and the other arguments of :class:`~polystore.SharedArrayStore`'s calls, checked.

A key travels through the engine as its *parts*: ``(bytes, bytes + NUL,
31-bit hash)``, as the index stores and finds it. Making them costs an
encode and a CRC, so the parts of recent keys are cached, in one dict that
the C paths read too. :func:`staged` checks the values and removals of one
update before anything is taken.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import fast as _fast
from . import layout as ix

if TYPE_CHECKING:
    from .write import Parts, Put

__all__ = ["MAX_UPDATE_KEYS", "key_cache", "key_parts", "staged"]

#: keys one update may put and remove: a change of 512 keys with the longest
#: names journals about 4,500 of the journal's 16,384 records
MAX_UPDATE_KEYS = 1024

#: the parts of recently used keys (valid ones only), by key
key_cache: dict[object, tuple[bytes, bytes, int]] = {}
_fast.set_key_cache(key_cache)  # the C paths look keys up there too
_c_key_parts = _fast.key_parts


def key_parts(key: object) -> tuple[bytes, bytes, int]:
    """(key bytes, key bytes + NUL, 31-bit hash) of a valid key.

    Raises:
        TypeError, ValueError: ``key`` is not a valid key (see :func:`layout.encode_key`).
    """
    found = key_cache.get(key) if type(key) is str else None
    if found is None and _c_key_parts is not None:
        found = _c_key_parts(key)  # made and cached in C (a fraction of the cold cost)
    if found is None:
        kb = ix.encode_key(key)
        found = (kb, kb + b"\0", zlib.crc32(kb) & 0x7FFFFFFF)
        if type(key) is str:
            if len(key_cache) >= 4096:
                key_cache.clear()
            key_cache[key] = found
    return found


def staged(
    values: Mapping[str, Any] | None, remove: Iterable[str], exclude: str | None = None
) -> tuple[list[Put], list[Parts]]:
    """The puts and removals of :meth:`SharedArrayStore.update`, checked: (puts, removals).

    Each put is (key parts, array, flags): bytes-like values become byte
    arrays flagged F_BYTES. ``exclude``: a key that may be in neither.
    """
    if isinstance(remove, (str, bytes)):
        raise TypeError(f"remove must be an iterable of keys, not one key: {remove!r}")
    gone = remove if type(remove) is list else list(remove)
    values = values or {}
    if len(gone) + len(values) > MAX_UPDATE_KEYS:
        raise ValueError(
            f"one update changes at most {MAX_UPDATE_KEYS} keys (its undo journal must fit "
            f"in the store's), got {len(gone) + len(values)}: split it"
        )
    puts: list[Put] = []
    for key, value in values.items():
        if type(value) is np.ndarray:
            puts.append((key_parts(key), value, 0))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(memoryview(value).cast("B"), dtype=np.uint8)
            puts.append((key_parts(key), arr, ix.F_BYTES))
        else:
            puts.append((key_parts(key), np.asarray(value), 0))
    removals = [key_parts(key) for key in gone]
    if (gone and values) or exclude is not None:  # (the steady state of a file: neither)
        both = set(values) & set(gone)
        if exclude is not None:
            both |= {exclude} & (set(values) | set(gone))
        if both:
            raise ValueError(f"keys both put and removed in one update: {sorted(both)}")
    return puts, removals
