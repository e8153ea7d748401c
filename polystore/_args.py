"""Arguments that several parts of polystore take alike, checked by one rule.

A timeout is a real number of seconds, at least zero (``bool`` is not one);
``None``, where it is allowed, waits as long as it takes. A size or a
capacity is an ``int`` above zero.
"""

from __future__ import annotations

import numbers

__all__ = ["check_seconds", "check_timeout", "positive"]


def check_timeout(value: object, what: str = "timeout") -> float | None:
    """``value`` as seconds, or ``None`` (no limit); see :func:`check_seconds`."""
    return None if value is None else check_seconds(value, what, " or None")


def check_seconds(value: object, what: str, allowed: str = "") -> float:
    """``value``, a real number of seconds at least zero, as a ``float``.

    Raises:
        TypeError: not a real number (``bool`` included).
        ValueError: negative or NaN.
    """
    # float and int first: an isinstance of an ABC costs 20 us with cold
    # caches, on every create_array of a pipeline
    plain = type(value) is float or type(value) is int
    if not plain and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{what} must be a number of seconds{allowed}, got {value!r}")
    seconds = float(value)  # type: ignore[arg-type]
    if not seconds >= 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {value!r}")
    return seconds


def positive(value: object, what: str) -> int:
    """``value``, an ``int`` above zero (``ValueError`` naming ``what`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
