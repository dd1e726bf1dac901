"""Task functions for the cost-hint tests: module-level so workers import them by reference."""

from __future__ import annotations

import os
import time
from typing import NamedTuple


class Segment(NamedTuple):
    """A stand-in for a media segment: its position in the input and its length in seconds."""

    n: int
    seconds: float


def stamp(seg: Segment) -> tuple[float, int, int]:
    """When the item started (CLOCK_MONOTONIC is machine-wide), in which process; then work for
    a time proportional to its length (1 ms per second of media)."""
    started = time.monotonic()
    time.sleep(seg.seconds / 1000)
    return started, os.getpid(), seg.n


def hold_memory(megabytes: int) -> int:
    """Allocate and touch ``megabytes``, hold it for a moment, free it."""
    block = bytearray(megabytes << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(1.5)
    return len(block)


def exit_on_41(seg: Segment) -> int:
    """Kill this worker the hard way on segment 41, else return the segment's number."""
    if seg.n == 41:
        os._exit(3)
    return seg.n
