from collections.abc import Callable, Iterator
from typing import Any

def run(fn: Callable[[Any], Any], items: list[Any], values: list[Any], slot: Any,
        field: int, /) -> None: ...
def read_within(it: Iterator[Any], size: int, max_bytes: int, into: list[Any], nothing: Any,
                /) -> Any: ...
