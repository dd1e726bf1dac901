"""What ``profile_stage`` returns: ``StageProfile``, with its summary text and its files.

``profile.json`` holds the recommendation (read back by ``stagepool.load_profile``, see
``stagepool._profile_file``), ``measurements.json`` everything measured, and the PNG plots (see
``_plots``) what a table cannot show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._config import format_size
from .._profile_file import PROFILE_FORMAT
from ._measured import PAGE_BYTES, SAMPLE_INTERVAL, SerialPass, SweepRun, WorkerSample
from ._plots import plot
from ._text import cpu_text, engine_text, secs

__all__ = ["StageProfile"]


@dataclasses.dataclass(frozen=True)
class StageProfile:
    """What :func:`profile_stage` measured and what it recommends.

    ``recommended`` is ready for ``Engine(**profile.recommended)`` (``workers``, ``chunk_size``,
    ``mem_per_task``, ``timeout``); ``reasons`` says why, one entry per key. ``limited_by`` names
    what stops more workers from paying: ``"cpu"``, ``"memory"``, ``"env"``
    (``STAGEPOOL_MAX_WORKERS``), ``"workers"`` (the counts you asked for), ``"ipc"`` (pickling and
    pipes: the parent cannot feed more workers) or ``"contention"`` (items slow each other down:
    memory bandwidth, caches, threads).
    """

    stage: str
    recommended: dict[str, Any]
    reasons: dict[str, str]
    limited_by: str
    mem_per_task: int
    serial: SerialPass
    runs: tuple[SweepRun, ...]
    confirmation: SweepRun | None
    samples: tuple[WorkerSample, ...]
    machine: dict[str, Any]
    sampler_cpu_share: float  # CPU time of the sampler thread / wall time of the sweep
    notes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    # With profile_stage(cost=...): timeout(item) = floor + per_cost x cost(item), in seconds
    timeout_per_cost: dict[str, float] | None = None

    @property
    def chosen(self) -> SweepRun:
        """The sweep run the recommendation was taken from."""
        rec = self.recommended
        return next(r for r in self.runs
                    if r.workers == rec["workers"] and r.chunk_size == rec["chunk_size"])

    @property
    def expected_throughput(self) -> float:
        """Items per second of the recommendation (confirmed when the confirmation ran)."""
        run = self.confirmation or self.chosen
        return run.adjusted

    def config(self) -> dict[str, Any]:
        """The content of ``profile.json``: the recommendation, its reasons, and context."""
        return {
            "format": PROFILE_FORMAT,
            "stage": self.stage,
            "recommended": dict(self.recommended),
            "reasons": dict(self.reasons),
            "limited_by": self.limited_by,
            "expected_throughput": _finite(self.expected_throughput),
            "machine": dict(self.machine),
            **({} if self.timeout_per_cost is None else
               {"timeout_per_cost": dict(self.timeout_per_cost)}),
        }

    def measurements(self) -> dict[str, Any]:
        """The content of ``measurements.json``: everything measured."""
        s = self.serial
        serial = {
            "items": [dict(m._asdict(), rss_growth=m.rss_growth) for m in s.items],
            "warmup": dict(s.warmup._asdict(), rss_growth=s.warmup.rss_growth),
            **{name: getattr(s, name).to_dict()
               for name in ("wall", "cpu", "rss_growth", "bytes_in", "bytes_out")},
            "worker_baseline_rss": s.worker_baseline_rss,
            "worker_baseline_uss": s.worker_baseline_uss,
            "worker_peak_rss": s.worker_peak_rss,
            "peak_growth": s.peak_growth,
            "overhead": s.overhead,
            "blas_threads": s.blas_threads,
            "peak_measured": s.peak_measured,
            "faults": s.faults.to_dict(),
            "kept_malloc_wall": None if s.kept_malloc_wall is None else s.kept_malloc_wall.to_dict(),
        }
        out: dict[str, Any] = _finite({
            **self.config(),
            "mem_per_task_bytes": self.mem_per_task,
            "serial": serial,
            "runs": [r.to_dict() for r in self.runs],
            "confirmation": None if self.confirmation is None else self.confirmation.to_dict(),
            "sampler": {"interval": SAMPLE_INTERVAL, "cpu_share": self.sampler_cpu_share,
                        "samples": [s._asdict() for s in self.samples]},
            "notes": list(self.notes),
        })
        return out

    def summary(self) -> str:
        """A human report: the serial pass, one table row per run, the recommendation."""
        return "\n".join(_summary_lines(self))

    def __str__(self) -> str:
        return self.summary()

    def write(self, out: str | os.PathLike[str], *, say: Callable[[str], None] | None = None,
              ) -> StageProfile:
        """Write profile.json, measurements.json and the plots into ``out``; return a copy of
        this profile whose ``files`` lists what was written. Creates ``out`` if needed."""
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        files = [directory / "profile.json", directory / "measurements.json"]
        files[0].write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        files[1].write_text(json.dumps(self.measurements(), indent=1) + "\n", encoding="utf-8")
        plots, note = plot(self, directory)
        if note and say is not None:
            say(note)
        notes = self.notes + ((note,) if note else ())
        return dataclasses.replace(self, files=tuple(files + plots), notes=notes)


def _summary_lines(p: StageProfile) -> list[str]:
    s = p.serial
    blas = s.blas_threads
    lines = [
        f"stage {p.stage}: {len(s.items)} sampled items, {len(s.failed)} failed",
        f"serial: wall {secs(s.wall.mean)}/item (median {secs(s.wall.median)}, p99 "
        f"{secs(s.wall.p99)}, max {secs(s.wall.max)}, sd {secs(s.wall.stdev)}; first call "
        f"{secs(s.warmup.wall)}), CPU {cpu_text(s)}",
        f"        peak RSS growth {format_size(s.rss_growth.mean)}/item (max "
        f"{format_size(s.rss_growth.max)}), worker {format_size(s.worker_baseline_rss)} RSS fresh "
        f"-> {format_size(s.worker_peak_rss)} peak; payload {format_size(s.bytes_in.mean)} in, "
        f"{format_size(s.bytes_out.mean)} out (pickled); round trip overhead {secs(s.overhead)}",
        f"        {s.faults.mean:.0f} page faults/item ({format_size(s.faults.mean * PAGE_BYTES)} of "
        f"fresh memory); BLAS threads: {blas.get('threads')} ({blas.get('source')})",
        "",
        f"{'workers':>7} {'chunk':>6} {'items':>8} {'wall s':>7} {'items/s':>9} {'adjusted':>9} "
        f"{'speedup':>7} {'effic.':>6} {'IPC':>5} {'CPU %':>6} {'RSS MiB':>8} {'spread':>6}",
    ]
    rows = [*p.runs, *([p.confirmation] if p.confirmation else [])]
    for r in rows:
        cpu = "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}"
        rss = "-" if r.peak_rss is None else f"{r.peak_rss / 2**20:.0f}"
        mark = "  <- recommended" if r is p.confirmation else ""
        lines.append(f"{r.workers:>7} {r.chunk_size:>6} {r.items:>8} {r.wall:>7.2f} "
                     f"{r.throughput:>9.4g} {r.adjusted:>9.4g} {r.speedup:>7.2f} {r.efficiency:>6.2f} "
                     f"{r.ipc_share:>5.0%} {cpu:>6} {rss:>8} {r.spread:>6.0%}{mark}")
    lines.append("(each row: the best of its rounds; adjusted: items/s over the share of CPU the "
                 "workers got, for a CPU-bound stage; spread: how much slower the slowest round was)")
    lines += ["", f"recommended: {engine_text(p.recommended, p.limited_by)}  [limited by "
                  f"{p.limited_by}; {p.expected_throughput:.4g} items/s]"]
    lines += [f"  {key}: {text}" for key, text in p.reasons.items()]
    lines.append(f"sampler: {len(p.samples)} samples every {SAMPLE_INTERVAL:g} s, "
                 f"{p.sampler_cpu_share:.2%} of one CPU")
    lines += [f"note: {note}" for note in p.notes]
    return lines


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: map them to None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (StageProfile,):
    _public.__module__ = "stagepool"
