"""What every workload is made of: the :class:`Workload` base class, targets, and small helpers.

A workload has a parent side (``params``: sizes and calibration, done once per harness run;
``specs``: its rows; ``metric``, ``targets``, ``derive``: judging the numbers) and a child side
(``prepare``, ``run`` and optionally ``final``, executed in the per-peer subprocess). The concrete
workloads live in ``suite.py`` (tiny, cpu, uneven, stream), ``faults.py`` (failures, crashes),
``payloads.py`` (big-arrays, media) and ``aio.py`` (async); ``suite.WORKLOADS`` registers them.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from .peers import Peer, PeerSpec

__all__ = ["MB", "MIB", "RssSampler", "Target", "Workload", "check", "format_rate", "map_specs",
           "timed_map", "workers_of"]

MB = 1e6
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for the stagepool row: ``check(row, rows_by_key)`` -> (passed or None, detail).

    ``None`` means "no verdict" (a missing baseline, or a size that does not define the target).
    """

    text: str
    check: Callable[[dict[str, Any], dict[str, dict[str, Any]]], tuple[bool | None, str]]
    # Which stagepool rows the goal is for (default: every judged row).
    applies: Callable[[dict[str, Any]], bool] = lambda row: True


class Workload:
    """Base class; see the module docstring. The class docstring's first line is the question."""

    name: ClassVar[str] = ""
    baseline: ClassVar[str] = "ppe"  # the row the "vs PPE" ratios are against

    @classmethod
    def question(cls) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    # -- parent side --
    def params(self, quick: bool) -> dict[str, Any]:
        raise NotImplementedError

    def facts(self, params: dict[str, Any]) -> str:
        """One line printed under the title: sizes, calibration and the physical limit."""
        return ""

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        raise NotImplementedError

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        """(warm-up runs, timed runs) for a row."""
        return 1, repeat

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-row extras from the runs: the median of each numeric field of the timed runs."""
        keys = {k for run in runs for k, v in run.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
        return {k: statistics.median(run[k] for run in runs if k in run) for k in sorted(keys)}

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        raise NotImplementedError

    def targets(self, params: dict[str, Any]) -> list[Target]:
        return []

    def judged(self, row: dict[str, Any]) -> bool:
        """Whether the targets apply to this row (stagepool's rows, unless a reference row)."""
        return row["peer"] == "stagepool"

    def ratio_seconds(self, row: dict[str, Any]) -> float | None:
        """The seconds that enter the "vs PPE" ratio; None leaves the row's ratio blank (a row
        that did not do the whole job must not look fast)."""
        return row["median_s"]  # type: ignore[no-any-return]

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        """(amount of work one run did, its unit) for the throughput plot, e.g. (20000, "items");
        None when the row did not do the workload's job (it is drawn as a labelled gap)."""
        return None

    def derive(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add rows computed from others (e.g. the best of two PPE chunk sizes), or annotate rows
        with numbers that need other rows (e.g. the hardware ceiling)."""
        return rows

    # -- child side --
    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        raise NotImplementedError

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def release(self, state: Any) -> None:
        """Close what ``prepare`` started (a reference pool), after the runs or on an error."""

    def final(self, peer: Peer, state: Any) -> dict[str, Any] | None:
        """One measurement after the timed runs, taken once per row (too long to repeat)."""
        return None


def format_rate(per_second: float) -> str:
    """Items per second for humans: ``4.9M/s``, ``472k/s``, ``568/s``, ``8.5/s``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_second >= scale:
            return f"{per_second / scale:.{1 if per_second < 100 * scale else 0}f}{unit}/s"
    return f"{per_second:.{1 if per_second < 10 else 0}f}/s"


def timed_map(peer: Peer, fn: Callable[[Any], Any], items: list[Any]) -> tuple[float, list[Any]]:
    began = time.perf_counter()
    values = peer.map(fn, items)
    return time.perf_counter() - began, values


def check(ok: bool, what: str) -> None:
    """Fail the row (a RuntimeError reaches the table as the row's error) on a wrong answer."""
    if not ok:
        raise RuntimeError(f"wrong results: {what}")


def workers_of(row: dict[str, Any], params: dict[str, Any]) -> int:
    return 1 if row["peer"] == "serial" else int(params["workers"])


def map_specs(*, dask_label: str = "dask.distributed client.map",
              ceiling_workers: int | None = None) -> list[PeerSpec]:
    """The rows of a plain map workload of slow items: every peer with its default chunking.

    ``ceiling_workers`` adds the hardware-ceiling row: the items split in advance over that many
    plain processes (the items must be numbers proportional to their work, see peers.CeilingPeer).
    """
    head = [PeerSpec("serial", "serial", "serial loop (1 run: the reference)")]
    if ceiling_workers:
        head.append(PeerSpec("ceiling", "ceiling",
                             f"hardware ceiling: {ceiling_workers} plain Processes, no pool"))
    return [
        *head,
        PeerSpec("ppe", "ppe", "ProcessPoolExecutor.map chunksize=1"),
        PeerSpec("mp", "mp", "multiprocessing.Pool.map (default chunks)"),
        PeerSpec("loky", "loky", "loky reusable executor chunksize=1"),
        PeerSpec("joblib", "joblib", 'joblib Parallel batch_size="auto"'),
        PeerSpec("mpire", "mpire", "mpire WorkerPool.map (default chunks)"),
        PeerSpec("pebble", "pebble", "pebble ProcessPool.map chunksize=1"),
        PeerSpec("dask", "dask", dask_label),
        PeerSpec("stagepool", "stagepool", 'stagepool Engine.map chunk_size="auto"'),
    ]


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``stop`` gives the peak."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        """Stop sampling; return peak - baseline in bytes (a final sample included)."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return int(self.peak - self.baseline)
