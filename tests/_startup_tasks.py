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


def hang_ignoring_sigterm_or_siblings(x: int) -> list[int]:
    """Item 0 hangs through SIGTERM (its worker dies only at the kill's SIGKILL, 0.5 s later);
    any other item lists the live processes its parent (the template) has forked."""
    import signal

    import psutil

    if x == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)
    return [p.pid for p in psutil.Process(os.getppid()).children()
            if p.status() != psutil.STATUS_ZOMBIE]
