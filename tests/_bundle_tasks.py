"""Functions for tests/test_bundles.py: short calls, one of which misbehaves."""

from __future__ import annotations

import os
import time

BAD = 13


def crash_on_bad(x: int) -> int:
    if x == BAD:
        os._exit(3)
    return x * 2


def hang_on_bad(x: int) -> int:
    if x == BAD:
        time.sleep(60)
    return x * 2


def raise_on_bad(x: int) -> int:
    if x == BAD:
        raise ValueError(f"bad {x}")
    return x * 2


def note_run(path: str, x: int) -> int:
    with open(path, "a") as file:
        file.write(f"{x}\n")
    return x * 2


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid_of(_: int) -> int:
    return os.getpid()


def note_then_crash_on_bad(x: int) -> int:
    """Append ``x`` to the file named by ``BUNDLE_RUNS`` (one line per run), then crash on BAD."""
    with open(os.environ["BUNDLE_RUNS"], "a") as file:
        file.write(f"{x}\n")
    return crash_on_bad(x)
