"""A media stage's module with heavy imports, for the respawn rows of ``benchmarks/startup.py``.

It imports numpy and scipy.signal (about 0.3-4 s cold on a loaded 2-core machine); where scipy
is missing, a synthetic 0.5 s import stands in for it, so the rows still measure a slow import.
"""

from __future__ import annotations

import os
import time

import numpy  # noqa: F401  # the point: what a replacement worker must have imported

try:
    import scipy.signal  # noqa: F401
    HEAVY = "numpy + scipy.signal"
except ImportError:  # pragma: no cover - depends on the machine
    time.sleep(0.5)
    HEAVY = "numpy + a synthetic 0.5 s import (no scipy here)"

TIMEOUT = 0.5  # the hung item's time limit in the respawn rows


def hang_or_probe(item: str) -> float:
    """``"hang:PATH"``: write this item's start (time.monotonic) to PATH and hang; any other
    item: return when it started, on the shared monotonic clock."""
    started = time.monotonic()
    if item.startswith("hang:"):
        with open(item[5:], "w") as out:
            out.write(repr(started))
        time.sleep(1000)
    return started


def die_at_deadline(path: str) -> None:
    """For peers without per-task timeouts: the worker dies when the limit would have fired."""
    hang_or_probe_start = time.monotonic()
    with open(path, "w") as out:
        out.write(repr(hang_or_probe_start))
    time.sleep(TIMEOUT)
    os._exit(1)


def probe_to(queue: object) -> None:
    queue.put(time.monotonic())  # type: ignore[attr-defined]
