from collections.abc import Callable
from typing import Any

def run(fn: Callable[[Any], Any], items: list[Any], values: list[Any], slot: Any,
        field: int, /) -> None: ...
