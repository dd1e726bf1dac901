"""The functions the pools run: module-level and importable, so every peer can pickle them by
reference (none of them may live in ``__main__``).

This module is what the workers import, so it imports nothing heavy at the top: numpy is used only
by :func:`numpy_work` and :func:`double_array` (it comes with their arguments anyway).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FAIL_EVERY", "double", "double_array", "fail_every_10th", "numpy_work", "payload_size",
           "ping", "run_share", "spin", "spin_or_die"]

FAIL_EVERY = 10  # fail_every_10th raises for the items i with i % FAIL_EVERY == FAIL_EVERY - 1

# The array numpy_work churns through. 4,096 float64 (32 KiB) stays in L1/L2, so the task is bound
# by the core, not by memory bandwidth that two workers would share.
NUMPY_WORK_SIZE = 4096


def ping(x: int) -> int:
    """Start-up probe: forces a lazily started pool to bring its workers up."""
    return x


def double(x: int) -> int:
    """The tiny task: nothing but the per-item cost of the pool itself."""
    return x * 2


def numpy_work(iterations: int) -> float:
    """A fixed amount of single-threaded numpy work (elementwise ufuncs, no BLAS threads)."""
    import numpy as np

    x = np.linspace(0.0, 1.0, NUMPY_WORK_SIZE)
    for _ in range(iterations):
        np.sin(x, out=x)
        np.add(x, 0.5, out=x)
    return float(x.sum())


def spin(seconds: float) -> float:
    """Burn one core for ``seconds`` of wall time (CPU work, not sleep); return ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def payload_size(payload: bytes) -> int:
    """The stream task: a small item in, a small result out."""
    return len(payload)


def fail_every_10th(i: int) -> int:
    """The failures task: ``i * 2``, except that every 10th item raises ``ValueError``."""
    if i % FAIL_EVERY == FAIL_EVERY - 1:
        raise ValueError(f"item {i} fails on purpose")
    return i * 2


def spin_or_die(item: tuple[int, float, bool]) -> int:
    """The crashes task: burn ``seconds`` of CPU, then, if ``die``, kill this worker process the
    hard way (``os._exit(1)``: no exception, no cleanup, like a segfault); else return the index."""
    index, seconds, die = item
    spin(seconds)
    if die:
        os._exit(1)
    return index


def double_array(a: Any) -> Any:
    """The big-arrays task: a cheap operation that returns a new array of the same size."""
    return a * 2.0


def run_share(fn: Callable[[Any], Any], share: list[tuple[int, Any]], gate: Any, conn: Any) -> None:
    """One process of the hardware ceiling: wait at ``gate`` until every process is up, run the
    share given in advance, send back ``[(index, value), ...]`` at once. numpy is imported before
    the gate (a spawned process would otherwise import it on the clock)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    gate.wait()
    conn.send([(i, fn(x)) for i, x in share])
    conn.close()
