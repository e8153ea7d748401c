# Type stub of the optional C extension built from _fastpath.c.
from collections.abc import Callable
from typing import Any

def set_key_cache(cache: dict[Any, tuple[bytes, bytes, int]]) -> None: ...
def _set_test_hook(hook: Callable[[], object] | None) -> None: ...

class Ctl:
    def __init__(
        self,
        buffer: Any,
        offsets: tuple[int, int, int, int, int, int],
        geometry: tuple[int, int, int, int, int],
        fields: tuple[int, ...],
        class_sizes: tuple[int, ...],
        small_put: int,
    ) -> None: ...
    def get(
        self, arena: Any, kbz: bytes, hash: int
    ) -> tuple[Any, int, int, int, int] | bool | None: ...
    def view(self, arena: Any, key: object) -> Any: ...
    def put_in_place(self, arena: Any, key: object, array: Any) -> bool: ...
    def bind(
        self,
        meta: dict[int, Any],
        ro_maps: dict[int, Any],
        rw_maps: dict[int, Any],
        refs: dict[int, Any],
        view_dead: Callable[[Any], object],
    ) -> None: ...
    def pin_add(self, index: int, delta: int) -> None: ...
    def release(self) -> None: ...
