"""The resource profiler behind ``stagepool profile``: measure a stage, recommend its Engine settings.

One call of :func:`profile_stage` runs these steps, in the caller's thread (plus one sampler
thread during the sweep)::

    sample items --list--> serial pass: Engine(workers=1), one submit per item of measure_item
        |                  (in the worker: wall and CPU time, RSS before and peak, result size;
        |                   in the parent: pickled item size, round trip) and worker_facts
        |                  (baseline RSS, BLAS threads; its USS read by pid from the parent)
        v
    sweep plan (pure): worker counts 1 .. min(usable CPUs, memory budget / memory per task),
        |              chunk sizes 1 .. ~0.5 s of work per chunk, items per run (~run_seconds)
        v
    sweep: `repeat` rounds over every configuration, each run in a fresh Engine (a worker's
        |  history changes its speed), engine.map(fn, items, chunk_size=c); the fastest round
        |  counts. Meanwhile Sampler (a thread, every 100 ms) reads CPU % and RSS of
        |  engine.worker_pids()
        v
    recommend (pure): the fastest configuration within TOLERANCE of the best with the fewest
        |             workers and smallest chunk; mem_per_task and timeout from the measurements;
        |             a reason for each
        v
    confirmation: Engine(**recommended) on the same items, `repeat` runs, the fastest counts
        |         (again without the timeout when the timeout seems to cost throughput)
        v
    StageProfile --out--> profile.json (load_profile, Engine(**...)), measurements.json, *.png

Where each step lives, in the order a first reading goes:

    stagepool._probe    what runs in the worker (measure_item, worker_facts, ...); outside this
                        package so that a profiled worker imports only it (no numpy, psutil or
                        engine): functions travel by reference, with their module's imports
    _measured           the measured data: Spread, ItemMeasurement, SerialPass, SweepRun,
                        WorkerSample
    _serial             the serial pass (the parent's side of the probe)
    _plan               the sweep plan (pure)
    _sweep              the sweep and the confirmation: engines, and the Sampler thread
    _recommend          the recommendation and its reasons (pure)
    _notes              notes on what the recommendation alone does not say (pure)
    _report, _plots     StageProfile: summary text, profile.json, measurements.json, plots
    _text               progress lines and the short forms the reports share
    _targets            MODULE:FUNCTION targets and sample factories for the command line
    stagepool._profile_file   load_profile: profile.json read back (Engine.from_profile)

Everything that decides (``chunk_candidates``, ``recommend_timeout``, ``recommend``, ...) is a pure
function of the measurements, so it can be tested without processes. Plots need matplotlib (an
optional extra), imported lazily; without it the plots are skipped with a note.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._config import check_positive_int, positive_size, validate_chunk_size
from .._profile_file import PROFILE_FORMAT, load_profile  # lives below the engine; named here too
from .._resources import ResourceSnapshot
from ._budget import DEFAULT_BUDGET, SERIAL_SHARE, fit_sweep
from ._measured import SerialPass, Spread, SweepRun, WorkerSample
from ._notes import (
    failure_notes,
    load_average,
    load_note,
    machine_facts,
    malloc_note,
    noise_note,
    waiting_note,
)
from ._plan import SweepPlan, chunk_candidates, default_counts, plan_sweep, profile_threads
from ._recommend import (
    TIMEOUT_COST,
    Recommendation,
    drop_timeout,
    recommend,
    recommend_cost_timeout,
    recommend_timeout,
    timeout_may_cost,
)
from ._report import StageProfile
from ._serial import serial_pass
from ._sweep import Sampler, confirm, on_cluster, sweep
from ._targets import TargetError, resolve_target, sample_from_factory
from ._text import Say, rate, recommended_text, serial_line

__all__ = [
    "PROFILE_FORMAT",
    "SerialPass",
    "Spread",
    "StageProfile",
    "SweepRun",
    "TargetError",
    "WorkerSample",
    "chunk_candidates",
    "load_profile",
    "profile_stage",
    "recommend_timeout",
    "resolve_target",
    "sample_from_factory",
]


def profile_stage(
    fn: Callable[[Any], Any],
    sample: Iterable[Any],
    *,
    workers: int | Sequence[int] | None = None,
    chunk_sizes: Sequence[int] | None = None,
    mem_limit: int | str | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    run_seconds: float = 1.0,
    repeat: int = 3,
    budget: float | None = DEFAULT_BUDGET,
    cost: Callable[[Any], float] | None = None,
    backend: str = "local",
    address: str | None = None,
) -> StageProfile:
    """Measure ``fn`` on ``sample`` and recommend the ``Engine`` settings for it.

    ``fn`` must be picklable (a module-level function), as for :meth:`Engine.map`. ``sample`` is
    read once into a list: a few to a few dozen representative items. Items that fail in the
    serial pass are reported and left out of the sweep.

    ``workers``: the worker counts to try: a sequence, or an int N for 1 .. N (powers of two
    and N above 8); default 1 .. the usable CPUs. Counts you ask for may oversubscribe the CPUs
    (for a stage that mostly waits); none ever exceeds what the memory budget allows.
    ``chunk_sizes``: the chunk sizes to try; default up to 5 sizes from 1 to ~0.5 s of work per
    chunk. ``mem_limit``: the memory the workers may use together (bytes or a size such as
    ``"4GiB"``); default what the machine (or its cgroup) has available now. ``run_seconds``: the
    target length of each sweep run; ``repeat``: rounds over every configuration, of which the
    fastest counts (other load on the machine only ever slows a run down). ``progress``: print
    what is happening to stderr. ``out``: a directory to write ``profile.json``,
    ``measurements.json`` and PNG plots into. ``backend="dask"``: the sweep's engines run on a
    dask cluster, an in-process ``LocalCluster`` of each worker count, or the one at ``address``
    (whose size is its own: the sweep then varies the chunk size only). The serial pass stays in
    a local worker: it measures the stage alone.

    ``budget``: seconds the whole profile should take (default 15; None: no limit). The serial
    pass takes at most a quarter of it (at least 3 items); the sweep then shrinks, in a fixed
    order, its run length, rounds, chunk sizes and worker counts to fit (see
    ``_profiling._budget``), and stops adding rounds past the deadline; a note says what was
    cut. Every engine of the profile gives each worker the same native thread budget (that of
    the widest run: usable CPUs // most workers), so the serial pass and the sweep compare alike.

    ``cost``: a callable of an item returning its size in any unit (samples, bytes, frames).
    The profile then also recommends a timeout that grows with it, ``floor + per_cost x
    cost(item)``, written to profile.json and applied by ``Engine.from_profile(path, cost=...)``.

    Raises ``ValueError`` / ``TypeError`` naming the argument for bad arguments, ``ValueError``
    when the sample is empty or every sampled item fails.

    Cancellation: a ``KeyboardInterrupt`` propagates; the engine in use is shut down (its workers
    killed) and the sampler thread stopped before it leaves this function. Nothing is written.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if isinstance(run_seconds, bool) or not isinstance(run_seconds, int | float) or run_seconds <= 0:
        raise ValueError(f"run_seconds must be > 0 seconds, got {run_seconds!r}")
    check_positive_int(repeat, "repeat")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or not budget > 0):
        raise ValueError(f"budget must be > 0 seconds or None, got {budget!r}")
    if cost is not None and not callable(cost):
        raise TypeError(f"cost must be a callable of an item (or None), not {type(cost).__name__}")
    sizes = _check_chunk_sizes(chunk_sizes)
    counts = _check_workers(workers)
    where = _check_where(backend, address, counts)
    mem_budget = None if mem_limit is None else positive_size(mem_limit, "mem_limit")
    items = list(sample)
    if not items:
        raise ValueError("sample is empty: give at least one item to profile the stage on")
    say = Say(progress)
    started = time.perf_counter()
    snapshot = ResourceSnapshot.read()
    load = load_average()
    stage = _stage_name(fn)
    threads = profile_threads(snapshot, counts)
    say(f"{stage}: serial pass on {len(items)} items in one worker ({threads} native "
        f"thread{'s' * (threads != 1)} per worker in every run)")
    serial = serial_pass(fn, items, say, threads=threads,
                         deadline=None if budget is None else started + SERIAL_SHARE * budget,
                         malloc_seconds=2.0 if budget is None else min(2.0, 0.1 * budget))
    good = [item for item, m in zip(items, serial.items, strict=False) if m.error is None]
    if not good:
        raise ValueError(f"every sampled item failed in {stage}; the first: {serial.items[0].error}")
    say(serial_line(serial))
    cost_rule = _cost_rule(cost, items, serial, say)  # before the sweep: a bad cost fails fast
    plan = _fit(on_cluster(dataclasses.replace(
        plan_sweep(serial, snapshot, budget=mem_budget, counts=counts, sizes=sizes,
                   run_seconds=run_seconds, repeat=repeat), where=where)),
        serial, threads, budget, started)
    for note in plan.notes:
        say(note)
    runs, rec, confirmation, sampler = _sweep_and_confirm(fn, good, serial, plan, say, started)
    samples = sampler.samples
    profile = StageProfile(
        stage=stage, recommended=rec.kwargs, limited_by=rec.limited_by,
        reasons=rec.reasons if cost_rule is None else {
            **rec.reasons, "timeout": f"{rec.reasons['timeout']}; with cost=: {cost_rule[1]}"},
        mem_per_task=rec.mem_per_task, serial=serial,
        runs=tuple(runs),
        confirmation=confirmation, samples=tuple(samples),
        machine=machine_facts(snapshot, mem_budget, load), sampler_cpu_share=sampler.cpu_share,
        notes=(*load_note(load, snapshot), *noise_note(runs, plan), *plan.notes,
               *failure_notes(serial), *waiting_note(serial, rec), *malloc_note(serial),
               *(() if confirmation is not None else (SKIPPED_CONFIRMATION,))),
        timeout_per_cost=None if cost_rule is None else cost_rule[0])
    if out is not None:
        profile = profile.write(out, say=say)
        say("wrote " + ", ".join(str(f) for f in profile.files))
    return profile


def _sweep_and_confirm(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass,
                       plan: SweepPlan, say: Say, started: float,
                       ) -> tuple[list[SweepRun], Recommendation, SweepRun | None, Sampler]:
    """The parallel sweep, the recommendation, and ``Engine(**recommended)`` measured, all while
    the sampler watches the workers. Past the time budget the confirmation is skipped (None):
    the sweep's own run of the chosen configuration stands for it."""
    with Sampler(started) as sampler:
        runs = sweep(fn, good, serial, plan, say, sampler)
        rec = recommend(runs, serial, plan)
        say(recommended_text(rec.kwargs, rec.limited_by, plan.cluster))
        if _past(plan, serial.start_seconds + plan.repeat * plan.run_seconds):
            say(f"{SKIPPED_CONFIRMATION}; expected {rate(rec.chosen)} items/s from the sweep")
            return runs, rec, None, sampler
        confirmation = confirm(fn, good, serial, plan, rec.kwargs, "recommended", sampler)
        if timeout_may_cost(rec, confirmation, serial) and not _past(plan):
            say("the timeout seems to cost throughput: confirming without it")
            untimed = confirm(fn, good, serial, plan, {**rec.kwargs, "timeout": None},
                              "recommended, no timeout", sampler)
            if untimed.adjusted > confirmation.adjusted * (1 + TIMEOUT_COST):
                rec, confirmation = drop_timeout(rec, confirmation, untimed), untimed
    say(f"confirmed: {rate(confirmation)} items/s (sweep {rate(rec.chosen)}, best "
        f"{max(r.adjusted for r in runs):.4g})")
    return runs, rec, confirmation, sampler


SKIPPED_CONFIRMATION = "time budget spent: the recommendation was not confirmed in an engine of its own"


def _past(plan: SweepPlan, ahead: float = 0.0) -> bool:
    """Whether the deadline has passed, or will before ``ahead`` more seconds of work end."""
    return plan.deadline is not None and time.perf_counter() + ahead > plan.deadline


def _fit(plan: SweepPlan, serial: SerialPass, threads: int, budget: float | None,
         started: float) -> SweepPlan:
    """The sweep plan with the profile's thread budget, cut to fit the time budget."""
    plan = dataclasses.replace(plan, threads=threads)
    if budget is None:
        return plan
    deadline = started + budget
    per_item = max(serial.wall.mean, 1e-7)
    fit = fit_sweep(deadline - time.perf_counter(), start=serial.start_seconds + 2 * per_item,
                    per_item=per_item, counts=plan.counts, sizes=plan.sizes, repeat=plan.repeat,
                    run_seconds=plan.run_seconds)
    notes = (*plan.notes, fit.note) if fit.note else plan.notes
    return dataclasses.replace(plan, counts=fit.counts, sizes=fit.sizes, repeat=fit.repeat,
                               run_seconds=fit.run_seconds, deadline=deadline, notes=notes)


def _cost_rule(cost: Callable[[Any], float] | None, items: list[Any], serial: SerialPass,
               say: Say) -> tuple[dict[str, float], str] | None:
    """With ``cost``: the cost-scaled timeout from the serial pass, and its reason. ``cost``
    runs here, in the parent; a failing or non-numeric one raises ValueError naming the item."""
    if cost is None:
        return None
    walls, costs = [], []
    for item, m in zip(items, serial.items, strict=False):
        if m.error is None:
            walls.append(m.wall)
            costs.append(_cost_of(cost, item, m.position))
    rule = recommend_cost_timeout(walls, costs)
    if rule is None:
        say("cost: no sampled item has a positive cost; no cost-scaled timeout")
    return rule


def _cost_of(cost: Callable[[Any], float], item: Any, position: int) -> float:
    try:
        value = float(cost(item))
    except Exception as exc:
        raise ValueError(f"cost(item {position}) failed: {type(exc).__name__}: {exc}") from exc
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"cost(item {position}) must be a finite number >= 0, got {value!r}")
    return value


# ---- argument checks ------------------------------------------------------------------------------


def _check_workers(workers: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if workers is None:
        return None
    if isinstance(workers, int) and not isinstance(workers, bool):
        check_positive_int(workers, "workers")
        return default_counts(workers)
    if isinstance(workers, str) or not isinstance(workers, Sequence) or not workers:
        raise TypeError(f"workers must be an int >= 1, a non-empty sequence of them, or None; "
                        f"not {workers!r}")
    for count in workers:
        check_positive_int(count, "workers")
    return tuple(sorted(set(workers)))


def _check_where(backend: str, address: str | None,
                 counts: tuple[int, ...] | None) -> dict[str, Any]:
    """The Engine options that name where the sweep runs (see ``SweepPlan.where``)."""
    if backend not in ("local", "dask"):
        raise ValueError(f"backend must be 'local' or 'dask', got {backend!r}")
    if address is not None and backend != "dask":
        raise ValueError("address= is the dask scheduler to use: it needs backend='dask'")
    if address is not None and counts is not None:
        raise ValueError("workers= sizes in-process clusters only; a cluster at an address "
                         "brings its own workers")
    if backend == "local":
        return {}
    return {"backend": "dask"} if address is None else {"backend": "dask", "address": address}


def _check_chunk_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    if isinstance(sizes, str) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(f"chunk_sizes must be a non-empty sequence of ints >= 1, not {sizes!r}")
    for size in sizes:
        if validate_chunk_size(size, name="chunk_sizes") is None:
            raise ValueError("chunk_sizes must be ints >= 1: the profiler measures fixed sizes")
    return tuple(sorted(set(sizes)))


def _stage_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}"
