"""What the profiler measures: plain, frozen data (no processes, no decisions).

``SerialPass`` holds the stage run on each sampled item alone (one ``ItemMeasurement`` each, made
by the worker probe in ``stagepool._probe``); ``SweepRun`` one configuration run through an
Engine; ``WorkerSample`` one reading of one worker by the sweep's sampler thread. ``Spread``
summarises a list of numbers. ``StageProfile`` (in ``_report``) holds them all.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = [
    "MIN_CLOCKED_SECONDS",
    "PAGE_BYTES",
    "SAMPLE_INTERVAL",
    "ItemMeasurement",
    "SerialPass",
    "Spread",
    "SweepRun",
    "WorkerSample",
    "cpu_ratio",
]

# Turns a count of minor page faults into bytes of fresh memory touched.
PAGE_BYTES = 4096
# CPU time per item is only meaningful above this (the CPU clock costs ~1 us to read).
MIN_CLOCKED_SECONDS = 50e-6
# The sampler's period (one WorkerSample per worker each time): fine enough to see a run of ~1 s,
# rare enough to cost well under 1 % of one CPU (two small /proc reads per worker per sample).
SAMPLE_INTERVAL = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class Spread:
    """Mean, median, 99th percentile (nearest rank), min, max and standard deviation."""

    mean: float
    median: float
    p99: float
    min: float
    max: float
    stdev: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = sorted(float(v) for v in values)
        if not data:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        p99 = data[max(0, math.ceil(0.99 * len(data)) - 1)]
        return cls(statistics.fmean(data), statistics.median(data), p99, data[0], data[-1],
                   statistics.pstdev(data), len(data))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class ItemMeasurement(NamedTuple):
    """One sampled item in the serial pass (sizes in bytes, times in seconds)."""

    position: int  # in the sample; -1 for the warm-up call
    wall: float  # in the worker, around the call
    cpu: float  # process CPU time in the worker (all its threads) during the call
    rss_before: int | None
    rss_peak: int | None  # peak RSS of the worker during the call (None: not measurable)
    bytes_in: int  # the item, pickled
    bytes_out: int  # the result, pickled
    round_trip: float  # in the parent: submit until the answer is back
    error: str | None  # "TypeName: message" when the item failed
    faults: int = 0  # minor page faults in the worker during the call (fresh memory touched)
    waited: float = 0.0  # the worker's thread runnable but without a CPU (a busy machine)

    @property
    def rss_growth(self) -> int | None:
        if self.rss_peak is None or self.rss_before is None:
            return None
        return max(0, self.rss_peak - self.rss_before)


@dataclasses.dataclass(frozen=True, slots=True)
class SerialPass:
    """The stage run on each sampled item alone, in one fresh worker."""

    items: tuple[ItemMeasurement, ...]
    warmup: ItemMeasurement  # the first item once more, first: imports and caches land here
    wall: Spread
    cpu: Spread
    rss_growth: Spread  # peak RSS during an item - RSS just before it
    bytes_in: Spread
    bytes_out: Spread
    worker_baseline_rss: int  # a fresh worker, before the stage was imported
    worker_baseline_uss: int  # the same, unique to the worker (what one more worker costs)
    worker_peak_rss: int  # the worker's peak over the whole pass (the stage imported, all items)
    overhead: float  # median round trip - wall: the cost of one submit, both ways
    blas_threads: dict[str, Any]
    peak_measured: bool  # False where the peak RSS could not be reset per item
    faults: Spread  # minor page faults per item
    kept_malloc_wall: Spread | None  # wall per item again, malloc keeping big blocks (see notes)
    start_seconds: float = 0.0  # starting the pass's engine and its warm-up item
    threads: int = 1  # native threads per worker, the same in every engine of the profile

    @property
    def ok(self) -> list[ItemMeasurement]:
        return [m for m in self.items if m.error is None]

    @property
    def failed(self) -> list[ItemMeasurement]:
        return [m for m in self.items if m.error is not None]

    @property
    def peak_growth(self) -> int:
        """How far the worker grew over its fresh baseline: stage import plus the worst item."""
        return max(0, self.worker_peak_rss - self.worker_baseline_rss)

    @property
    def slowest(self) -> float:
        return max([self.warmup.wall, *(m.wall for m in self.ok)])


@dataclasses.dataclass(frozen=True, slots=True)
class SweepRun:
    """One configuration measured through the engine."""

    workers: int
    chunk_size: int
    items: int
    ok: int
    wall: float
    busy: float  # seconds the workers spent inside the stage (from the engine's stats)
    throughput: float  # successful items per second
    speedup: float  # throughput x serial seconds per item
    efficiency: float  # speedup / workers
    ipc_share: float  # (wall x workers - busy) / (wall x workers): pickling, pipes, waiting
    durations: Spread  # per-item durations in the workers (a sample of up to 4096)
    cpu_percent: float | None  # mean sampled CPU % per worker during the run
    peak_rss: int | None  # largest sampled worker RSS during the run
    started: float  # seconds since the profile started
    ended: float
    label: str
    rounds: tuple[float, ...] = ()  # throughput of every round; the fields above are the fastest
    # CPU the workers got while inside items, as a share of what the stage uses alone (serial
    # CPU/wall): under 1 when other processes took the CPUs. None when not measurable.
    cpu_share: float | None = None
    adjusted: float = 0.0  # throughput / cpu_share (floored): what a quiet machine would give

    @property
    def spread(self) -> float:
        """How much slower the slowest round was than the fastest (0.0: identical rounds)."""
        fastest = max(self.rounds, default=0.0)
        return 1 - min(self.rounds) / fastest if fastest > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["durations"] = self.durations.to_dict()
        return out


class WorkerSample(NamedTuple):
    """One reading of one worker by the sampler."""

    t: float  # seconds since the profile started
    run: str | None  # label of the run in progress, None between runs
    pid: int
    cpu_percent: float | None  # since this pid's previous reading (None on the first)
    rss: int | None


def cpu_ratio(serial: SerialPass) -> float | None:
    """CPU time / wall time of an item in the serial pass, the time its worker waited for a
    CPU left out (other processes' doing: a CPU-bound stage measured 0.64 on a busy machine,
    and its runs were not adjusted for the CPU they did not get); None for items too short to
    clock."""
    if serial.wall.mean < MIN_CLOCKED_SECONDS:
        return None
    waited = statistics.fmean(m.waited for m in serial.ok) if serial.ok else 0.0
    return serial.cpu.mean / max(serial.wall.mean - waited, 1e-9)
