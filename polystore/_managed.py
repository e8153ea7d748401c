"""A manager's shared mapping that an interrupted call cannot leave out of step.

A ``multiprocessing`` manager proxy sends each call over one connection per
thread and reads the answer back. An exception from a signal handler
(Ctrl-C's ``KeyboardInterrupt``) that lands between the two leaves the
answer unread: the next call reads it as its own (another key's value) or
waits for ever on a stream cut mid-message. CPython keeps that connection
(boto's s3transfer met the same hang and opens a new one). So
:class:`MemoryBackend <polystore.MemoryBackend>` reaches a proxy through
:class:`Resyncing`, which drops the connection after any call that did not
end with the manager's answer; the proxy then opens a fresh one.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["Resyncing", "resyncing"]


def _answered(exc: BaseException) -> bool:
    """Whether ``exc`` is the manager's answer, raised again here (its exchange completed).

    The manager's errors are raised by ``_callmethod`` itself once the answer
    is read; anything raised deeper (in the connection, or by a Python signal
    handler) or by a handler written in C (Ctrl-C's default one, which
    raises a ``KeyboardInterrupt``, not an ``Exception``) may have cut the
    exchange.
    """
    if not isinstance(exc, Exception):
        return False
    tb: types.TracebackType | None = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code is _call_method().__code__


def _call_method() -> Any:
    """``BaseProxy._callmethod`` (imported only when a proxy is met: managers import a lot)."""
    from multiprocessing.managers import BaseProxy

    return BaseProxy._callmethod


class Resyncing(MutableMapping[str, Any]):
    """The mapping behind a manager's dict proxy, through calls that never leave it out of step."""

    __slots__ = ("call", "proxy")

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.call = _call_method()

    def _call(self, name: str, args: tuple[Any, ...] = ()) -> Any:
        # Invariant kept: a call that did not end with the manager's answer
        # drops this thread's connection (the proxy opens a new one), even when
        # another exception lands while the first is handled: the drop is in
        # the finally, and is one C call (dict.pop) that no signal handler can
        # cut short (handlers run after a call returns, not between the loads
        # of its arguments). The connection closes when it is collected.
        answered = False
        try:
            result = self.call(self.proxy, name, args)
            answered = True
            return result
        except Exception as exc:
            answered = _answered(exc)
            raise
        finally:
            if not answered:
                self.proxy._tls.__dict__.pop("connection", None)

    def __getitem__(self, key: str) -> Any:
        return self._call("__getitem__", (key,))

    def __setitem__(self, key: str, value: Any) -> None:
        self._call("__setitem__", (key, value))

    def __delitem__(self, key: str) -> None:
        self._call("__delitem__", (key,))

    def __contains__(self, key: object) -> bool:
        return bool(self._call("__contains__", (key,)))

    def __len__(self) -> int:
        return int(self._call("__len__"))

    def __iter__(self) -> Iterator[str]:
        return iter(self._call("keys"))

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", (key, default))

    def pop(self, key: str, *default: Any) -> Any:
        return self._call("pop", (key, *default))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        self._call("update", (dict(other, **kwargs),))

    def keys(self) -> Any:
        return self._call("keys")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Resyncing, (self.proxy,))


def resyncing(mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``mapping`` itself, or :class:`Resyncing` over it when it is a manager's proxy."""
    if hasattr(mapping, "_callmethod") and hasattr(mapping, "_tls"):
        from multiprocessing.managers import BaseProxy

        if isinstance(mapping, BaseProxy):
            return Resyncing(mapping)
    return mapping
