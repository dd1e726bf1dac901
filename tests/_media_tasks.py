"""Module-level task functions for test_media.py (workers import them by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import stagepool as sp


def crash_once(path: str) -> str:
    """Kill the worker the first time (a marker file remembers), then succeed."""
    marker = Path(path)
    if not marker.exists():
        marker.write_text("crashed")
        os._exit(7)
    return "ok"


def gain_in_place(segment: Any) -> float:
    """An in-place gain, as a media stage writes it."""
    np.multiply(segment, 0.5, out=segment)
    return float(segment.sum())


def shared_sum(name: str) -> float:
    return float(np.asarray(sp.shared(name)).sum())


def shared_value(name: str) -> Any:
    return sp.shared(name)


def shared_sum_in_threads(name: str) -> list[float]:
    """Read a shared value from threads the task starts (a decoder's reader thread)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(shared_sum, [name, name]))


def shared_info(name: str) -> tuple[int, bool, bool]:
    """(pid, writeable, is a view of a mapping rather than an own copy) of a shared array."""
    arr = sp.shared(name)
    return os.getpid(), bool(arr.flags.writeable), not arr.flags.owndata


def write_shared(name: str) -> None:
    sp.shared(name)[0] = 1


def shared_then_exit(name: str) -> float:
    sp.shared(name)
    os._exit(3)


def pid_and_shared(name: str) -> tuple[int, float]:
    return os.getpid(), float(np.asarray(sp.shared(name)).sum())


def init_keep(arg: Any) -> None:
    global _kept
    _kept = arg


_kept: Any = None


def kept_len(_: Any) -> int:
    return len(_kept)


def sleep_then(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def allocate_mib(mib: int) -> int:
    """Allocate (and touch) ``mib`` MiB, as a decoder given a huge item would."""
    block = np.ones(mib * 2**20, np.uint8)
    return int(block[-1]) * mib
