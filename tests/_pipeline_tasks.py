"""Stages for the pipeline tests, importable by workers (module-level, pickled by reference).

A segment is ``(index, plan, trail)``: ``plan`` maps a stage name to what that stage does on
this segment ("error", "crash", "segfault", "hang", "slow", "late", "unpicklable": returns a
value that cannot travel back; "flaky": raises the first time it runs in a process;
"flaky-crash": raises the first time, then kills its worker; "crash-once:<folder>": kills its
worker the first time, a marker file in <folder> remembers);
``trail`` lists the stages that ran before (a join merges its inputs' trails)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Any

Seg = tuple[int, dict[str, str], tuple[str, ...]]
_FLAKED: set[tuple[str, int]] = set()  # (stage, segment) that a "flaky" plan failed in this process


def seg(index: int, **plan: str) -> Seg:
    return (index, plan, ())


class Step:
    """A stage that passes the segment on, adding its name to the trail, or misbehaves."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *inputs: Seg) -> Seg:
        index, plan, _ = inputs[0]
        how = plan.get(self.name)
        if how == "error":
            raise ValueError(f"{self.name} refused segment {index}")
        if how in ("flaky", "flaky-crash") and (self.name, index) not in _FLAKED:
            _FLAKED.add((self.name, index))
            raise ValueError(f"{self.name} refused segment {index} the first time")
        if how in ("crash", "flaky-crash"):
            os._exit(7)
        if how is not None and how.startswith("crash-once:"):
            marker = Path(how.partition(":")[2]) / f"crashed-{self.name}-{index}"
            if not marker.exists():
                marker.touch()
                os._exit(9)
        if how == "segfault":
            ctypes.string_at(0)
        if how == "hang":
            time.sleep(10**6)
        if how == "late":
            time.sleep(0.6)
        if how == "slow":
            time.sleep(0.2)
        if how == "unpicklable":
            return (index, plan, (threading.Lock(),))  # type: ignore[return-value]
        trail = (*sorted({name for seg_ in inputs for name in seg_[2]}), self.name)
        return (index, plan, trail)


class LockedStep(Step):
    """A stage object that cannot be pickled (it holds a lock, as a model wrapper might)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.lock = threading.Lock()


def diamond_stages() -> list[tuple[str, tuple[str, ...]]]:
    return [("decode", ()), ("resample", ("decode",)), ("features", ("resample",)),
            ("loudness", ("resample",)), ("encode", ("features", "loudness"))]


def touch_then_pass(item: tuple[int, str]) -> tuple[int, str]:
    """Sleep 0.2 s, then leave a file named after the segment: what ran, and when."""
    index, folder = item
    time.sleep(0.2)
    (Path(folder) / str(index)).touch()
    return item


def first(item: Any) -> Any:
    return item


# ---- setup / teardown -----------------------------------------------------------------------------


def make_ctx() -> tuple[int, float]:
    return (os.getpid(), time.monotonic())


def with_ctx(x: int, *, ctx: tuple[int, float]) -> tuple[int, tuple[int, float]]:
    return (x, ctx)


def broken_setup() -> None:
    raise OSError("no model file")


def noted_teardown_factory(folder: str) -> Any:
    return _Teardown(folder)


class _Teardown:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, ctx: tuple[int, float]) -> None:
        (Path(self.folder) / f"teardown-{ctx[0]}").touch()


def broken_teardown(ctx: tuple[int, float]) -> None:
    raise OSError("model file locked")


# ---- arrays ----------------------------------------------------------------------------------------


def make_array(i: int) -> Any:
    import numpy as np

    return np.full(2 * 2**20, i, np.float32)  # 8 MiB


def scale(a: Any) -> Any:
    return a * 2


def shift(a: Any) -> Any:
    return a + 1


def crash_once(item: tuple[int, str]) -> int:
    """Kill the worker the first time a segment runs (a marker file remembers), then pass."""
    index, folder = item
    marker = Path(folder) / f"crashed-{index}"
    if not marker.exists():
        marker.touch()
        os._exit(9)
    return index


class Tally:
    """A stage that notes each run of each segment in ``folder`` (one line per run), then passes."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, index: int) -> int:
        with open(Path(self.folder) / f"tally-{index}", "a") as f:
            f.write("ran\n")
        return index

    def runs(self, index: int) -> int:
        path = Path(self.folder) / f"tally-{index}"
        return len(path.read_text().splitlines()) if path.exists() else 0


# ---- dispatch order ---------------------------------------------------------------------------------


def log_start(item: tuple[int, str]) -> int:
    """Append the segment's value to the run's log as it starts (the dispatch order)."""
    value, log = item
    with open(log, "a") as f:
        f.write(f"{value}\n")
    return value


def nap(item: Any) -> Any:
    time.sleep(0.05)
    return item


def long_nap(item: Any) -> Any:
    time.sleep(0.1)
    return item
