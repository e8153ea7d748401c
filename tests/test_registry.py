"""BackendRegistry: lazy built-ins, explicit registration, sharing rules."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from polystore import BackendNotFoundError, BackendRegistry, MemoryBackend, NotShareableError
from polystore import registry as registry_module
from polystore.base import Kind, StorageBackend
from polystore.exceptions import MissingDependencyError


class NullBackend(StorageBackend):
    """A do-nothing backend for registration tests."""

    name = "null"

    def __init__(self, flag: int = 0) -> None:
        self.flag = flag

    def save(self, data: Any, path: Any, **kwargs: Any) -> None:
        pass

    def load(self, path: Any, **kwargs: Any) -> Any:
        return None

    def kind(self, path: Any) -> Kind | None:
        return None

    def list_dir(self, path: Any) -> list[str]:
        return []

    def ensure_directory(self, path: Any) -> str:
        return str(path)

    def delete(self, path: Any, recursive: bool = False) -> None:
        pass


def test_default_names() -> None:
    registry = BackendRegistry()
    assert {"disk", "memory", "zarr", "shm"} <= set(registry)
    assert list(registry) == sorted(registry)
    assert not registry.is_loaded("disk")


def test_lazy_build_and_cache() -> None:
    registry = BackendRegistry()
    memory = registry["memory"]
    assert isinstance(memory, MemoryBackend)
    assert registry["memory"] is memory
    assert registry.is_loaded("memory")


def test_missing_name() -> None:
    registry = BackendRegistry()
    with pytest.raises(BackendNotFoundError) as info:
        registry["dsik"]
    assert isinstance(info.value, KeyError)
    assert "dsik" in str(info.value) and "disk" in str(info.value)


def test_register_instance_class_and_path() -> None:
    registry = BackendRegistry(defaults=False)
    registry.register("a", NullBackend(1))
    registry.register("b", NullBackend, flag=2)
    registry.register("c", "tests.test_registry:NullBackend", flag=3)
    assert [registry[n].flag for n in "abc"] == [1, 2, 3]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", NullBackend())
    registry.register("a", NullBackend(9), replace=True)
    assert registry["a"].flag == 9  # type: ignore[attr-defined]


def test_a_backend_whose_module_is_missing_says_what_to_install() -> None:
    registry = BackendRegistry(defaults=False)
    registry.register("plugin", "polystore_no_such_plugin.store:Backend")
    with pytest.raises(MissingDependencyError) as info:
        registry["plugin"]
    assert isinstance(info.value, ImportError) and info.value.package == "polystore_no_such_plugin"
    assert "backend 'plugin'" in str(info.value) and "pip install" not in str(info.value)
    # a built-in backend with an extra names the command that installs it
    recipe = registry_module._Spec("polystore_no_such_plugin:Backend", extra="zarr")
    with pytest.raises(MissingDependencyError, match=r"pip install 'polystore\[zarr\]'"):
        recipe.build("zarr")


def test_a_path_to_something_other_than_a_backend_class_is_refused() -> None:
    registry = BackendRegistry(defaults=False)
    registry.register("a", "tests.test_registry:NoSuchClass")
    registry.register("b", "tests.test_registry:test_missing_name")
    for name in "ab":
        with pytest.raises(TypeError, match="not a StorageBackend subclass"):
            registry[name]


@pytest.mark.parametrize("bad", [object(), 3, "no_colon", dict])
def test_register_refuses_non_backends(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        BackendRegistry().register("x", bad)


def test_close_closes_what_it_built() -> None:
    closed = []

    class Closing(NullBackend):
        def close(self) -> None:
            closed.append(self.flag)

    registry = BackendRegistry(defaults=False)
    registry.register("built", Closing, flag=1)
    registry.register("given", Closing(2))
    registry["built"]
    registry["given"]
    registry.close()
    assert closed == [1]


def test_pickle_keeps_recipes_and_refuses_private_backends() -> None:
    registry = BackendRegistry()
    clone = pickle.loads(pickle.dumps(registry))
    assert set(clone) == set(registry)
    with pytest.raises(NotShareableError, match="shared_registry"):
        clone["memory"].save(1, "x.json")
    registry["memory"]
    with pytest.raises(NotShareableError):
        pickle.dumps(registry)


def test_building_a_registry_imports_no_backend(run_python: Any) -> None:
    proc = run_python(
        """
        import sys
        import polystore
        registry = polystore.BackendRegistry()
        names = list(registry)
        print(sorted(m for m in sys.modules if m.startswith(("polystore.", "zarr"))))
        """
    )
    loaded = proc.stdout
    for module in ("polystore.disk", "polystore.zarr_backend", "polystore.shm_backend", "'zarr"):
        assert module not in loaded


def test_entry_point_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    class FakeEntryPoint:
        name = "thirdparty"
        value = "tests.test_registry:NullBackend"

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        return [FakeEntryPoint()] if group == "polystore.backends" else []

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    assert "thirdparty" not in BackendRegistry()
    registry = BackendRegistry(entry_points=True)
    assert "thirdparty" in registry
    assert type(registry["thirdparty"]).__name__ == "NullBackend"


def test_entry_point_backends_survive_pickling_before_first_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata

    class FakeEntryPoint:
        name = "thirdparty"
        value = "tests.test_registry:NullBackend"

    monkeypatch.setattr(metadata, "entry_points", lambda group: [FakeEntryPoint()])
    registry = BackendRegistry(entry_points=True)  # nothing asked for yet
    clone = pickle.loads(pickle.dumps(registry))
    assert "thirdparty" in clone
    assert type(clone["thirdparty"]).__name__ == "NullBackend"
