"""Keyword names of the original polystore, accepted with a ``DeprecationWarning``.

Where polystore renamed a keyword (``source_path`` became ``src``) and
accepting the old name costs nothing, :func:`renamed_keywords` maps it onto
the new one and warns, naming the new name, instead of failing with a
``TypeError``. See docs/migrating.rst.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["IGNORED", "renamed_keywords"]

F = TypeVar("F", bound=Callable[..., Any])

#: the new name of a keyword that polystore accepts and ignores
IGNORED = ""


def renamed_keywords(**old_to_new: str) -> Callable[[F], F]:
    """Accept each old keyword as its new name (or drop it, if it maps to :data:`IGNORED`).

    Raises (from the decorated function):
        TypeError: both the old and the new name were passed.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    _rename(func.__qualname__, kwargs, old, new)
            return func(*args, **kwargs)

        return cast(F, wrapper)

    return decorate


def _rename(where: str, kwargs: dict[str, Any], old: str, new: str) -> None:
    value = kwargs.pop(old)
    if new == IGNORED:
        message = f"{where}(): the keyword {old!r} is deprecated and has no effect; leave it out"
    else:
        if new in kwargs:
            raise TypeError(f"{where}() got {old!r} and its new name {new!r}; pass only {new!r}")
        message = f"{where}(): the keyword {old!r} is deprecated; use {new!r}"
        kwargs[new] = value
    # stacklevel 3: the warning points at the caller of the decorated function
    warnings.warn(message, DeprecationWarning, stacklevel=3)
