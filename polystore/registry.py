"""Named backends, imported and built on first use.

A :class:`BackendRegistry` maps names to backends. Built-in names point at
dotted import paths, so ``import polystore`` imports no backend's dependencies
and a registry costs nothing until a backend is asked for. Third-party
packages may add names through the ``polystore.backends`` entry-point group;
programs add them with :meth:`BackendRegistry.register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from .base import StorageBackend, UnavailableBackend
from .exceptions import BackendNotFoundError, MissingDependencyError

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry"]

#: entry-point group scanned for third-party backends (``name = "pkg.module:Class"``)
ENTRY_POINT_GROUP = "polystore.backends"


class _Spec:
    """How to build a backend that has not been built yet."""

    __slots__ = ("extra", "kwargs", "process_local", "target")

    def __init__(
        self,
        target: str | type[StorageBackend],
        kwargs: Mapping[str, Any] | None = None,
        extra: str | None = None,
        process_local: bool = False,
    ) -> None:
        self.target = target
        self.kwargs = dict(kwargs or {})
        #: extra to install when the import fails
        self.extra = extra
        #: a default-built instance is private to the process that builds it
        self.process_local = process_local

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Spec, (self.target, self.kwargs, self.extra, self.process_local))

    def build(self, name: str) -> StorageBackend:
        cls = self.target if isinstance(self.target, type) else self._import(name)
        backend = cls(**self.kwargs)
        if not isinstance(backend, StorageBackend):
            built = type(backend).__name__
            raise TypeError(f"backend {name!r} built a {built}, not a StorageBackend")
        return backend

    def _import(self, name: str) -> type[StorageBackend]:
        module_name, _, attr = str(self.target).partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # the backend's module, or one it needs
            needed_by = f"backend {name!r} ({self.target})"
            raise MissingDependencyError(exc.name or module_name, self.extra, needed_by) from exc
        # Any other ImportError is a bug in that module: it goes up as it is.
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, StorageBackend)):
            raise TypeError(f"{self.target!r} is not a StorageBackend subclass")
        return cls


_BUILTIN: dict[str, _Spec] = {
    "disk": _Spec("polystore.disk:DiskBackend"),
    "memory": _Spec("polystore.memory:MemoryBackend", process_local=True),
    "shm": _Spec("polystore.shm_backend:SharedMemoryBackend", process_local=True),
    "zarr": _Spec("polystore.zarr_backend:ZarrBackend", extra="zarr"),
}


_PRIVATE = (
    "backend {name!r} of this registry is private to the process that made the registry, so "
    "this process cannot see its files; share it with polystore.shared_registry() or register "
    "a shared instance before sending the registry"
)


class BackendRegistry(Mapping[str, StorageBackend]):
    """A read-only mapping of backend names to backends, built lazily.

    Args:
        backends: extra entries, as in :meth:`register`; they replace built-ins
            of the same name.
        defaults: include the built-in ``disk``, ``memory``, ``shm`` and ``zarr``.
        entry_points: also offer backends from the ``polystore.backends``
            entry-point group (read once, on first need).

    Backends are built on first access and cached, so every lookup of one name
    returns the same object. :meth:`close` closes the backends the registry
    built. Pickling sends built backends (which must be shareable) and the
    recipes of the others; a default ``memory`` or ``shm`` backend that was
    never built arrives as a stand-in that refuses to be used, because a fresh
    one in the other process would not hold the files of this one.
    """

    def __init__(
        self,
        backends: Mapping[str, StorageBackend | type[StorageBackend] | str] | None = None,
        *,
        defaults: bool = True,
        entry_points: bool = False,
    ) -> None:
        self._specs: dict[str, _Spec] = dict(_BUILTIN) if defaults else {}
        self._instances: dict[str, StorageBackend] = {}
        self._built: set[str] = set()
        self._entry_points_pending = entry_points
        for name, backend in (backends or {}).items():
            self.register(name, backend, replace=True)

    def register(
        self,
        name: str,
        backend: StorageBackend | type[StorageBackend] | str,
        *,
        replace: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add a backend under ``name``.

        Args:
            name: the name ``FileManager`` calls will use.
            backend: an instance (used as is), a ``StorageBackend`` subclass or a
                ``"module:Class"`` string (built with ``kwargs`` on first use).
            replace: allow replacing an existing name; otherwise that is an error.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"backend names are non-empty strings, got {name!r}")
        self._load_entry_points()
        if name in self and not replace:
            raise ValueError(f"a backend named {name!r} is already registered; pass replace=True")
        self._instances.pop(name, None)
        self._built.discard(name)
        if isinstance(backend, StorageBackend):
            if kwargs:
                raise TypeError("keyword arguments apply only to a class or an import path")
            self._specs.pop(name, None)
            self._instances[name] = backend
        elif isinstance(backend, str) or (
            isinstance(backend, type) and issubclass(backend, StorageBackend)
        ):
            if isinstance(backend, str) and ":" not in backend:
                raise ValueError(f"import paths look like 'package.module:Class', got {backend!r}")
            self._specs[name] = _Spec(backend, dict(kwargs))
        else:
            raise TypeError(
                "register() takes a StorageBackend instance, a StorageBackend subclass or "
                f"a 'module:Class' string, got {type(backend).__name__}"
            )

    def _load_entry_points(self) -> None:
        if not self._entry_points_pending:
            return
        self._entry_points_pending = False
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._specs and ep.name not in self._instances:
                self._specs[ep.name] = _Spec(ep.value)

    def __getitem__(self, name: str) -> StorageBackend:
        try:
            return self._instances[name]
        except KeyError:
            pass
        except TypeError:
            raise TypeError(f"backend names are strings, got {type(name).__name__}") from None
        if not isinstance(name, str):
            raise TypeError(f"backend names are strings, got {type(name).__name__}")
        self._load_entry_points()
        spec = self._specs.get(name)
        if spec is None:
            raise BackendNotFoundError(name, self)
        backend = self._instances.setdefault(name, spec.build(name))
        self._built.add(name)
        return backend

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` has been built (or was registered as an instance)."""
        return name in self._instances

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(sorted(set(self._specs) | set(self._instances)))

    def __len__(self) -> int:
        self._load_entry_points()
        return len(set(self._specs) | set(self._instances))

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._instances or name in self._specs

    def close(self) -> None:
        """Close the backends this registry built (not those registered as instances)."""
        for name in sorted(self._built):
            backend = self._instances.pop(name, None)
            if backend is not None:
                backend.close()
        self._built.clear()

    def __enter__(self) -> BackendRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # The entry points this registry offers travel as recipes like the rest,
        # even if nothing asked for a backend before pickling.
        self._load_entry_points()
        specs = {n: s for n, s in self._specs.items() if n not in self._instances}
        local = sorted(n for n, s in specs.items() if s.process_local and not s.kwargs)
        for name in local:
            del specs[name]
        instances: dict[str, StorageBackend] = dict(self._instances)
        instances.update({n: UnavailableBackend(n, _PRIVATE.format(name=n)) for n in local})
        return (_rebuild, (specs, instances))

    def __repr__(self) -> str:
        names = ", ".join(f"{n}{'*' if self.is_loaded(n) else ''}" for n in self)
        return f"BackendRegistry({names})"


def _rebuild(specs: dict[str, _Spec], instances: dict[str, StorageBackend]) -> BackendRegistry:
    registry = BackendRegistry(defaults=False)
    registry._specs = dict(specs)
    registry._instances = dict(instances)
    return registry
