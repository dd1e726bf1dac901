"""The serial pass: the stage run on each sampled item alone, in one fresh worker.

The parent side of the measurement: it ships each item with the probe (``stagepool._probe``,
which runs in the worker and imports nothing heavy), times the round trip, and sums the items up
in a ``SerialPass``. Items that page-fault a lot are timed once more with malloc keeping its big
blocks, for the note that says what that would buy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .._engine import Engine
from .._probe import keep_malloc_memory, measure_item, worker_facts
from .._resources import THREAD_ENV_VARS, uss_of
from .._worker import dumps
from ._measured import PAGE_BYTES, ItemMeasurement, SerialPass, Spread
from ._plan import engine_options
from ._text import Say

__all__ = ["serial_pass"]

# Items that touch more fresh memory than this each (page faults x PAGE_BYTES) are timed again
# with malloc keeping its big blocks (see _malloc_experiment).
FAULT_NOTE_BYTES = 2 * 2**20
# About this much of the stage's time goes to that second timing (2 to 8 items).
MALLOC_EXPERIMENT_SECONDS = 2.0
MIN_SERIAL_ITEMS = 3  # measured whatever the budget says


def serial_pass(fn: Callable[[Any], Any], items: list[Any], say: Say, *, threads: int,
                deadline: float | None = None, malloc_seconds: float = MALLOC_EXPERIMENT_SECONDS,
                ) -> SerialPass:
    """``fn`` on each item alone in one fresh worker (after a warm-up call on the first item),
    with ``threads`` native threads (as every engine of the profile). An item that raises,
    cannot be pickled or kills the worker is recorded as that item's error in the pass, not
    raised. Past ``deadline`` (time.perf_counter) no more items are measured, once
    MIN_SERIAL_ITEMS are: ``items`` of the pass is then a prefix of the sample."""
    started = time.perf_counter()
    with Engine(workers=1, **engine_options(threads)) as engine:
        fresh = _worker_facts(engine)
        warmup = _measure_one(engine, fn, items[0], -1)
        start_seconds = time.perf_counter() - started
        measured: list[ItemMeasurement] = []
        for index, item in enumerate(items):
            if (deadline is not None and index >= MIN_SERIAL_ITEMS
                    and time.perf_counter() > deadline):
                say(f"serial pass: {index} of {len(items)} items measured within the time budget")
                break
            say.tick(f"serial pass {index + 1}/{len(items)}")
            measured.append(_measure_one(engine, fn, item, index))
        final = _worker_facts(engine)
        tuned = _malloc_experiment(engine, fn, items, measured, say, malloc_seconds)
    ok = [m for m in measured if m.error is None] or [warmup]
    growth = [g for g in (m.rss_growth for m in ok) if g is not None]
    peaks = [m.rss_peak for m in [warmup, *measured] if m.rss_peak is not None]
    return SerialPass(
        items=tuple(measured), warmup=warmup,
        wall=Spread.of(m.wall for m in ok), cpu=Spread.of(m.cpu for m in ok),
        rss_growth=Spread.of(growth), bytes_in=Spread.of(m.bytes_in for m in ok),
        bytes_out=Spread.of(m.bytes_out for m in ok),
        worker_baseline_rss=int(fresh["rss"]), worker_baseline_uss=int(fresh["uss"]),
        worker_peak_rss=max([int(final["rss"]), *peaks]),
        overhead=max(0.0, statistics.median(m.round_trip - m.wall for m in [warmup, *measured])),
        blas_threads=dict(final["blas"]), peak_measured=bool(peaks),
        faults=Spread.of(m.faults for m in ok), kept_malloc_wall=tuned,
        start_seconds=start_seconds, threads=threads)


def _worker_facts(engine: Engine) -> dict[str, Any]:
    """The probe's facts about the engine's one worker, and its USS: psutil reads that from here,
    by pid, so that the probe (and the worker measured) never imports psutil."""
    facts = engine.submit(worker_facts, THREAD_ENV_VARS).result()
    return {**facts, "uss": uss_of(facts["pid"]) or 0}


def _malloc_experiment(engine: Engine, fn: Callable[[Any], Any], items: list[Any],
                       measured: list[ItemMeasurement], say: Say,
                       seconds: float) -> Spread | None:
    """Items that page-fault a lot: time a few again once malloc keeps its big blocks.

    glibc hands blocks over its mmap threshold back to the system when they are freed, so a
    stage with big temporaries touches fresh pages (and pays a fault for each) on every item.
    """
    ok = [(item, m) for item, m in zip(items, measured, strict=False) if m.error is None]
    if not ok or statistics.fmean(m.faults for _, m in ok) * PAGE_BYTES < FAULT_NOTE_BYTES:
        return None
    if not engine.submit(keep_malloc_memory).result():
        return None
    mean = statistics.fmean(m.wall for _, m in ok)
    count = max(2, min(8, int(seconds / max(mean, 1e-9))))
    say.tick("serial pass: timing items again with malloc keeping its memory")
    _measure_one(engine, fn, ok[0][0], -1)  # the first one grows the heap: not counted
    again = [_measure_one(engine, fn, item, m.position) for item, m in ok[:count]]
    walls = [m.wall for m in again if m.error is None]
    return Spread.of(walls) if walls else None


def _measure_one(engine: Engine, fn: Callable[[Any], Any], item: Any, index: int,
                 ) -> ItemMeasurement:
    try:
        bytes_in = len(dumps(item))
    except Exception as exc:
        return ItemMeasurement(index, 0.0, 0.0, None, None, 0, 0, 0.0,
                               f"the item cannot be pickled: {type(exc).__name__}: {exc}")
    start = time.perf_counter()
    try:
        wall, cpu, before, peak, size, error, faults, waited = engine.submit(
            measure_item, fn, item).result()
    except Exception as exc:  # the worker crashed, or the function could not be shipped
        return ItemMeasurement(index, time.perf_counter() - start, 0.0, None, None, bytes_in, 0,
                               time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return ItemMeasurement(index, wall, cpu, before, peak, bytes_in, size,
                           time.perf_counter() - start, error, faults, waited)
