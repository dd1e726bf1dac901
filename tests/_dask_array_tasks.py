"""Task functions on big arrays for the dask transport tests: module-level so that workers
import them by reference."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def plus_one(a: Any) -> Any:
    return a + 1


def write_first(a: Any) -> float:
    """Writes into its input: fails on a read-only one."""
    a[0] = -1.0
    return float(a[0])


def exit_on_negative(a: Any) -> float:
    """Kills its lane (as a crash would) when the array starts with a negative number."""
    if a[0] < 0:
        os._exit(3)
    return float(a.sum())


def layouts(seed: int) -> dict[str, Any]:
    """Big results of every layout the transport must keep: Fortran order, a strided view made
    contiguous, a structured dtype, the same array twice, and a small one in the pickle."""
    rng = np.random.default_rng(seed)
    shared = rng.random(300_000)
    structured = np.zeros(200_000, dtype=[("a", "i4"), ("b", "f8")])
    structured["a"] = np.arange(200_000)
    return {"fortran": np.asfortranarray(rng.random((700, 300))),
            "strided": rng.random((1000, 400))[::2, ::3], "structured": structured,
            "twice": (shared, shared), "small": np.arange(10)}


def note_then_sleep_with_array(item: tuple[int, float, str, Any]) -> int:
    """``_tasks.note_then_sleep`` on an item that also carries a big array (which travels as a
    dask frame, scattered to the chunk's worker)."""
    import _tasks

    index, seconds, folder, _array = item
    return _tasks.note_then_sleep((index, seconds, folder))
