"""Task functions for the asyncio bridge tests: module-level so workers import them by reference."""

from __future__ import annotations

import os
import time
from pathlib import Path


def spin(seconds: float) -> float:
    """Busy CPU for ``seconds`` (a stand-in for decoding a frame): no sleep, no GIL release."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def mark_and_sleep(arg: tuple[str, int, float]) -> int:
    """Write ``start-<i>`` (holding this worker's pid) in a folder, sleep, then write ``end-<i>``.

    The files let a test see which items started, which finished and in which process."""
    folder, index, seconds = arg
    Path(folder, f"start-{index}").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(folder, f"end-{index}").write_text(str(os.getpid()))
    return index


def started(folder: str | Path) -> dict[int, int]:
    """Item index -> worker pid, for every item of ``mark_and_sleep`` that started."""
    out = {}
    for path in Path(folder).glob("start-*"):
        text = path.read_text()
        if text:
            out[int(path.name.split("-")[1])] = int(text)
    return out


def ended(folder: str | Path) -> set[int]:
    return {int(path.name.split("-")[1]) for path in Path(folder).glob("end-*")}
