"""The profiler's time budget (pure): how much to measure so that a profile takes ~``budget`` s.

A profile is a serial pass, a sweep of ``counts x sizes x repeat`` runs (each in a fresh engine:
a start, a warm-up, ~run_seconds of work) and a confirmation (one engine, ``repeat`` runs). An
82-second profile of a 23 ms stage was 30 runs whose big chunks forced each run to take 4 chunks
per worker of up to 0.5 s. ``fit_sweep`` shrinks, in this order, until the estimate fits: the
run length (down to MIN_RUN_SECONDS), the rounds (3 -> 2), the chunk sizes (to 3), the rounds
(-> 1), the chunk sizes (to 2: 1 and the largest that fits), the worker counts (1, the widest and
one between). Chunk sizes whose mandatory 4 chunks per worker would outlast a run are left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["DEFAULT_BUDGET", "MIN_RUN_SECONDS", "SERIAL_SHARE", "SweepFit", "fit_sweep",
           "sweep_seconds"]

DEFAULT_BUDGET = 15.0  # seconds: a profile is a step in a workflow, not a coffee break
SERIAL_SHARE = 0.25  # of the budget, at most, for the serial pass (at least MIN_SERIAL_ITEMS)
MIN_SERIAL_ITEMS = 3
MIN_RUN_SECONDS = 0.25  # a shorter run is mostly its own start and tail
FILL = 0.9  # of the remaining time planned: the estimate is only an estimate
MIN_CHUNKS_PER_WORKER = 4  # as _plan.items_per_run: what a run of one chunk size must hold


@dataclasses.dataclass(frozen=True, slots=True)
class SweepFit:
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    repeat: int
    run_seconds: float
    estimate: float  # seconds the sweep and the confirmation should take
    note: str  # what was cut to fit, "" when nothing was


def sweep_seconds(runs: int, repeat: int, run_seconds: float, start: float) -> float:
    """Estimated seconds of ``runs`` sweep runs and a confirmation of ``repeat`` runs."""
    return (runs + 1) * start + (runs + repeat) * run_seconds


def _fits(sizes: Sequence[int], per_item: float, run_seconds: float) -> tuple[int, ...]:
    kept = [s for s in sizes if s == 1 or MIN_CHUNKS_PER_WORKER * s * per_item <= run_seconds]
    return tuple(kept)


def _thin(values: Sequence[int], n: int) -> tuple[int, ...]:
    """``n`` of ``values`` spread evenly, the first and the last kept."""
    if len(values) <= n:
        return tuple(values)
    picks = {round(i * (len(values) - 1) / (n - 1)) for i in range(n)}
    return tuple(values[i] for i in sorted(picks))


def fit_sweep(remaining: float, *, start: float, per_item: float, counts: Sequence[int],
              sizes: Sequence[int], repeat: int, run_seconds: float) -> SweepFit:
    """The largest sweep, cut in the documented order, whose estimate fits ``remaining`` s
    (``start``: seconds to start an engine and warm it up). When even the smallest does not
    fit, the smallest (1 round, 2 sizes, 3 counts, MIN_RUN_SECONDS) with a note saying so."""
    target = max(0.0, remaining) * FILL
    steps = [(repeat, 99, 99), (min(repeat, 2), 99, 99), (min(repeat, 2), 3, 99), (1, 3, 99),
             (1, 2, 99), (1, 2, 3)]
    fit = None
    for rounds, n_sizes, n_counts in steps:
        kept_counts = _thin(counts, n_counts)
        runs_per_size = len(kept_counts) * rounds
        # the run length that fills the target with every size, then the sizes that length holds
        trial = _thin(sizes, n_sizes)
        length = min(run_seconds, (target - (len(trial) * runs_per_size + 1) * start)
                     / max(1, len(trial) * runs_per_size + rounds))
        kept_sizes = _thin(_fits(trial, per_item, max(length, MIN_RUN_SECONDS)), n_sizes)
        runs = len(kept_sizes) * runs_per_size
        length = min(run_seconds, (target - (runs + 1) * start) / max(1, runs + rounds))
        fit = SweepFit(kept_counts, kept_sizes, rounds, max(length, MIN_RUN_SECONDS),
                       sweep_seconds(runs, rounds, max(length, MIN_RUN_SECONDS), start), "")
        if length >= MIN_RUN_SECONDS or (rounds, n_sizes, n_counts) == steps[-1]:
            break
    assert fit is not None
    return dataclasses.replace(fit, note=_note(fit, counts, sizes, repeat, run_seconds, remaining))


def _note(fit: SweepFit, counts: Sequence[int], sizes: Sequence[int], repeat: int,
          run_seconds: float, remaining: float) -> str:
    cut = [f"{what} {list(before)} -> {list(after)}" for what, before, after in (
        ("worker counts", counts, fit.counts), ("chunk sizes", sizes, fit.sizes)) if
        tuple(before) != tuple(after)]
    if fit.repeat < repeat:
        cut.append(f"rounds {repeat} -> {fit.repeat}")
    if not math.isclose(fit.run_seconds, run_seconds):
        cut.append(f"run length {run_seconds:g} s -> {fit.run_seconds:.2g} s")
    if not cut:
        return ""
    over = f"; it still needs about {fit.estimate:.0f} s" if fit.estimate > remaining else ""
    return f"to fit the time budget ({remaining:.0f} s left for the sweep): {', '.join(cut)}{over}"
