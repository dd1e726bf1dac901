"""Functions for tests/test_startup.py; importing this module records which process did it."""

from __future__ import annotations

import os
import random
import sys
import time

IMPORTED_BY = os.getpid()


def where(_: object = None) -> tuple[int, int, int]:
    """(the pid that imported this module, this worker's pid, its parent's pid)."""
    return IMPORTED_BY, os.getpid(), os.getppid()


def draws(_: object = None) -> tuple[int, float, float]:
    import numpy as np

    time.sleep(0.2)  # keep this worker busy so that the next item goes to the other one
    return os.getpid(), random.random(), float(np.random.random())


def hang_first(x: int) -> tuple[int, int, int]:
    if x == 0:
        time.sleep(1000)
    return where()


def modules(_: object = None) -> bool:
    return "json.decoder" in sys.modules




def note_start(path: str) -> None:
    """An initializer: append when this worker started (time.monotonic, shared by processes)."""
    with open(path, "a") as out:
        out.write(f"{time.monotonic()!r}\n")


def hang_ignoring_sigterm(path: str) -> None:
    """Write this item's start (time.monotonic) to ``path``, then hang through SIGTERM: the
    worker dies only at the kill's SIGKILL, 0.5 s later."""
    import signal

    with open(path, "w") as out:
        out.write(repr(time.monotonic()))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1000)
