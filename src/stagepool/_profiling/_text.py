"""How the profiler talks: progress lines while it runs, and the short forms its reports share
(durations, rates, one line per run or serial pass)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from .._config import format_size
from .._planning import count_of
from ._measured import SerialPass, SweepRun, cpu_ratio

__all__ = ["Say", "cpu_text", "kwargs_text", "rate", "run_line", "secs", "serial_line"]


class Say:
    """Progress lines on stderr ("profile: ..."); on a terminal also an in-place item counter."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and self.stream.isatty()
        self._ticking = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self._ticking:
            self.stream.write("\r\x1b[K")
            self._ticking = False
        print(f"profile: {message}", file=self.stream, flush=True)

    def tick(self, message: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[Kprofile: {message}")
            self.stream.flush()
            self._ticking = True


def secs(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def engine_text(kwargs: Mapping[str, Any], limited_by: str) -> str:
    """``Engine(...)`` as recommended; on a cluster without ``workers=``: a cluster brings its
    own workers (its threads) and refuses the argument."""
    shown = {k: v for k, v in kwargs.items() if not (limited_by == "cluster" and k == "workers")}
    return f"Engine({kwargs_text(shown)})"


def recommended_text(kwargs: Mapping[str, Any], limited_by: str, cluster: str) -> str:
    """The profiler's "recommended:" line: the engine and the limit that won (on a cluster,
    ``cluster``: its address, workers and threads, not this machine's CPUs)."""
    limit = f"cluster: {cluster}" if limited_by == "cluster" else limited_by
    return f"recommended: {engine_text(kwargs, limited_by)}, limited by {limit}"


def serial_line(s: SerialPass) -> str:
    return (f"serial: {secs(s.wall.mean)}/item (p99 {secs(s.wall.p99)}, max "
            f"{secs(s.wall.max)}), CPU {cpu_text(s)}, peak RSS growth "
            f"{format_size(s.rss_growth.max)}/item, payload {format_size(s.bytes_in.mean)} in, "
            f"{format_size(s.bytes_out.mean)} out; {len(s.failed)} of {len(s.items)} failed")


def cpu_text(s: SerialPass) -> str:
    ratio = cpu_ratio(s)
    if ratio is None:
        return "n/a (items too short to clock)"
    return f"{secs(s.cpu.mean)}/item (CPU/wall {ratio:.2f})"


def rate(run: SweepRun) -> str:
    """Items per second, with the adjusted figure when other processes took CPU from the run."""
    if run.adjusted > run.throughput * 1.02:
        return f"{run.throughput:.4g} (adjusted {run.adjusted:.4g})"
    return f"{run.throughput:.4g}"


def run_line(run: SweepRun) -> str:
    return (f"{count_of(run.workers, 'worker')}, chunk {run.chunk_size}: {rate(run)} items/s over "
            f"{run.items} items, efficiency {run.efficiency:.2f}, IPC {run.ipc_share:.0%}")
