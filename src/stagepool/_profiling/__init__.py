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
from ._plan import SweepPlan, chunk_candidates, default_counts, plan_sweep
from ._recommend import (
    TIMEOUT_COST,
    Recommendation,
    drop_timeout,
    recommend,
    recommend_timeout,
    timeout_may_cost,
)
from ._report import StageProfile
from ._serial import serial_pass
from ._sweep import Sampler, confirm, engine_at, sweep
from ._targets import TargetError, resolve_target, sample_from_factory
from ._text import Say, kwargs_text, rate, serial_line

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
    sizes = _check_chunk_sizes(chunk_sizes)
    counts = _check_workers(workers)
    where = _check_where(backend, address, counts)
    budget = None if mem_limit is None else positive_size(mem_limit, "mem_limit")
    items = list(sample)
    if not items:
        raise ValueError("sample is empty: give at least one item to profile the stage on")
    say = Say(progress)
    started = time.perf_counter()
    snapshot = ResourceSnapshot.read()
    load = load_average()
    stage = _stage_name(fn)
    say(f"{stage}: serial pass on {len(items)} items in one worker")
    serial = serial_pass(fn, items, say)
    good = [item for item, m in zip(items, serial.items, strict=True) if m.error is None]
    if not good:
        raise ValueError(f"every sampled item failed in {stage}; the first: {serial.items[0].error}")
    say(serial_line(serial))
    if where.get("address") is not None:  # the cluster's own size is the one count to try
        with engine_at(where) as probe:
            counts = (probe.workers,)
    plan = dataclasses.replace(
        plan_sweep(serial, snapshot, budget=budget, counts=counts, sizes=sizes,
                   run_seconds=run_seconds, repeat=repeat), where=where)
    for note in plan.notes:
        say(note)
    runs, rec, confirmation, sampler = _sweep_and_confirm(fn, good, serial, plan, say, started)
    samples = sampler.samples
    profile = StageProfile(
        stage=stage, recommended=rec.kwargs, reasons=rec.reasons, limited_by=rec.limited_by,
        mem_per_task=rec.mem_per_task, serial=serial,
        runs=tuple(runs),
        confirmation=confirmation, samples=tuple(samples),
        machine=machine_facts(snapshot, budget, load), sampler_cpu_share=sampler.cpu_share,
        notes=(*load_note(load, snapshot), *noise_note(runs, plan), *plan.notes,
               *failure_notes(serial), *waiting_note(serial, rec), *malloc_note(serial)))
    if out is not None:
        profile = profile.write(out, say=say)
        say("wrote " + ", ".join(str(f) for f in profile.files))
    return profile


def _sweep_and_confirm(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass,
                       plan: SweepPlan, say: Say, started: float,
                       ) -> tuple[list[SweepRun], Recommendation, SweepRun, Sampler]:
    """The parallel sweep, the recommendation, and ``Engine(**recommended)`` measured, all while
    the sampler watches the workers."""
    with Sampler(started) as sampler:
        runs = sweep(fn, good, serial, plan, say, sampler)
        rec = recommend(runs, serial, plan)
        say(f"recommended: Engine({kwargs_text(rec.kwargs)}), limited by {rec.limited_by}; "
            "confirming")
        confirmation = confirm(fn, good, serial, plan, rec.kwargs, "recommended", sampler)
        if timeout_may_cost(rec, confirmation, serial):
            say("the timeout seems to cost throughput: confirming without it")
            untimed = confirm(fn, good, serial, plan, {**rec.kwargs, "timeout": None},
                              "recommended, no timeout", sampler)
            if untimed.adjusted > confirmation.adjusted * (1 + TIMEOUT_COST):
                rec, confirmation = drop_timeout(rec, confirmation, untimed), untimed
    say(f"confirmed: {rate(confirmation)} items/s (sweep {rate(rec.chosen)}, best "
        f"{max(r.adjusted for r in runs):.4g})")
    return runs, rec, confirmation, sampler


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
