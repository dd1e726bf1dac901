"""Synthetic stages with known behaviour for the profiler tests (module-level: workers import them).

Each stage has a factory ``<stage>_items`` for ``stagepool profile MODULE:FUNCTION --items
MODULE:FACTORY``, and the broken factories and targets the command must reject cleanly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

# ~5-10 ms of pure-Python arithmetic on one core: CPU-bound, holds the GIL, no allocation.
SPIN_LOOPS = 150_000
HOG_MIB = 160  # what ``hog`` allocates and touches per item
NAP_SECONDS = 0.02


def spin(loops: int) -> int:
    """CPU-bound: a fixed amount of work per item, so two workers do twice as much as one."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def spin_items() -> Iterator[int]:
    while True:
        yield SPIN_LOOPS


def hog(mib: int) -> float:
    """Memory-hungry: allocates ``mib`` MiB and writes every page, then returns a small float."""
    block = np.ones(mib * 2**20 // 8)
    return float(block[:: 4096 // 8].sum())


def hog_items() -> list[int]:
    return [HOG_MIB] * 4


def tiny(x: int) -> int:
    """Tiny items: a microsecond of work, so the round trip dominates unless chunks are big."""
    return x + 1


def tiny_items() -> range:
    return range(64)


def nap(seconds: float) -> float:
    """Slow items that use no CPU: the chunk size cannot help them."""
    time.sleep(seconds)
    return seconds


def nap_items() -> list[float]:
    return [NAP_SECONDS] * 4


def fail(x: object) -> object:
    raise ValueError(f"cannot process {x!r}")


def raising_factory() -> list[int]:
    raise RuntimeError("no camera attached")


def not_iterable_factory() -> int:
    return 42


def empty_factory() -> list[int]:
    return []


def failing_generator() -> Iterator[int]:
    yield 1
    raise OSError("the source went away")


NOT_CALLABLE = 42


def measure_spin_on_cpu(cpu: int) -> Any:
    """In a worker: pin it to ``cpu``, then measure a CPU-bound item there (``measure_item``)."""
    from stagepool import _probe

    os.sched_setaffinity(0, {cpu})
    return _probe.measure_item(spin, 3_000_000)
