"""Array-handling task functions for the transport tests (module-level: imported by workers)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


def double(a: np.ndarray) -> np.ndarray:
    return a * 2


def scale_nested(item: dict[str, Any]) -> dict[str, Any]:
    return {"frames": item["frames"] * 2, "meta": item["meta"], "pair": tuple(x + 1 for x in item["pair"])}


def write_in_place(a: np.ndarray) -> float:
    a[0] = 42  # read-only views refuse this; writable_inputs=True gives a private copy
    return float(a[0])


def is_writeable(a: np.ndarray) -> bool:
    return bool(a.flags.writeable)


def big_then_crash(a: np.ndarray) -> np.ndarray:
    if float(a.flat[0]) < 0:
        os._exit(5)
    return a + 1


def big_then_hang(a: np.ndarray) -> np.ndarray:
    if float(a.flat[0]) < 0:
        time.sleep(10**6)
    return a + 1


def make_big(n: int) -> np.ndarray:
    return np.full(n, 7, dtype=np.float32)


_KEPT: list[np.ndarray] = []


def keep_first_input(a: np.ndarray) -> float:
    """Keeps a reference to its first input (as a cache would) and reads it on every call."""
    if not _KEPT:
        _KEPT.append(a)
    return float(_KEPT[0][0])


def crash_once_then_double(item: tuple[np.ndarray, str]) -> np.ndarray:
    """Kills its worker the first time it sees ``marker`` (a path), doubles its array after."""
    a, marker = item
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return a * 2
    os._exit(9)


def fault_with_arrays(item: tuple[Any, int, np.ndarray]) -> tuple[np.ndarray, Any]:
    """Runs one row of the fault table on ``x`` with a big array in and a big array out."""
    fn, x, a = item
    return a * 2, fn(x)


class _ExitWhenPickled:
    def __reduce__(self) -> Any:
        os._exit(7)


def die_while_sending(a: np.ndarray) -> Any:
    """The result's big array is already in a segment when pickling the rest kills the worker."""
    if float(a.flat[0]) < 0:
        return a * 2, _ExitWhenPickled()
    return a * 2


def double_or_raise(a: np.ndarray) -> np.ndarray:
    """Doubles ``a``; raises (naming its first value) when that value is negative."""
    if a.size and float(a.flat[0]) < 0:
        raise ValueError(f"negative segment {float(a.flat[0])}")
    return a * 2


def keep_and_fail_once(item: tuple[np.ndarray, str]) -> float:
    """Keeps its input (so the worker unlinks the segment at the end of the chunk) and raises the
    first time it sees ``marker``; the retry must still carry the original data."""
    a, marker = item
    _KEPT.append(a)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return float(a.sum(dtype=np.float64))
    raise ValueError("first attempt fails")


def scale_in_place(a: np.ndarray) -> float:
    a *= 2  # numpy's "output array is read-only" on a read-only view
    return float(a[0])


def write_frozen_buffer(n: int) -> int:
    a = np.frombuffer(bytes(n), dtype=np.uint8)  # read-only, and nothing to do with the inputs
    a[0] = 1
    return n


def double_after_the_caller_dies(a: np.ndarray) -> np.ndarray:
    """From value 6 on, waits until the caller has died (the worker is re-parented), then
    answers: an item that ends a moment after its caller was killed, made certain."""
    if float(a.flat[0]) >= 6:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(0.001)
    return a * 2


class DiesWhenFreedElsewhere:
    """An argument whose finalizer ends any process but the caller's it was unpickled in (a C
    library's handle that aborts when closed in a child)."""

    def __init__(self, caller: int) -> None:
        self.caller = caller

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return DiesWhenFreedElsewhere, (self.caller,)

    def __del__(self) -> None:
        if os.getpid() != self.caller:
            os._exit(7)


class HangsWhenFreedElsewhere(DiesWhenFreedElsewhere):
    """An argument whose finalizer hangs in any process but the caller's it was unpickled in."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return HangsWhenFreedElsewhere, (self.caller,)

    def __del__(self) -> None:
        if os.getpid() != self.caller:
            time.sleep(3600)


def first_of(item: tuple[np.ndarray, Any]) -> float:
    return float(item[0][0])
