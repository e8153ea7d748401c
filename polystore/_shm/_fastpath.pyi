# Type stub of the optional C extension built from _fastpath.c.
from collections.abc import Callable
from typing import Any

def set_key_cache(cache: dict[Any, tuple[bytes, bytes, int]], max_key_bytes: int) -> None: ...
def key_parts(key: object) -> tuple[bytes, bytes, int] | None: ...
def _set_test_hook(hook: Callable[[], object] | None) -> None: ...
def _arm_faults(at: int) -> int: ...
def _fault_step() -> None: ...

class Ctl:
    def __init__(
        self,
        buffer: Any,
        offsets: tuple[int, ...],
        geometry: tuple[int, int, int, int, int],
        fields: tuple[int, ...],
        class_sizes: tuple[int, ...],
        small_put: int,
    ) -> None: ...
    def get(
        self, arena: Any, kbz: bytes, hash: int
    ) -> tuple[Any, int, int, int, int] | bool | None: ...
    def view(self, arena: Any, key: object) -> Any: ...
    def contains(self, key: object) -> bool | None: ...
    def put_small(
        self,
        arena: Any,
        key: object,
        array: Any,
        absent: tuple[tuple[bytes, bytes, int], ...] = (),
        present: tuple[tuple[bytes, bytes, int], ...] = (),
    ) -> bool: ...
    def take(self, arena: Any, cls: int) -> int: ...
    def publish(
        self,
        arena: Any,
        kbz: bytes,
        hash: int,
        block: int,
        nbytes: int,
        dt: bytes,
        shape: tuple[int, ...],
        flags: int,
        absent: tuple[tuple[bytes, bytes, int], ...] = (),
        present: tuple[tuple[bytes, bytes, int], ...] = (),
    ) -> bool: ...
    def bind(
        self,
        meta: dict[int, Any],
        ro_maps: dict[int, Any],
        rw_maps: dict[int, Any],
        refs: dict[int, Any],
        view_dead: Callable[[Any], object],
        dtypes: dict[bytes, Any],
    ) -> None: ...
    def pin_add(self, index: int, delta: int) -> None: ...
    def release(self) -> None: ...
