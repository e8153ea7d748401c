# Type stub of the optional C extension built from _fastpath.c.
from collections.abc import Callable
from typing import Any

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
    def view(self, arena: Any, kbz: bytes, hash: int) -> Any: ...
    def put_in_place(self, arena: Any, kbz: bytes, hash: int, array: Any) -> bool: ...
    def release(self) -> None: ...
