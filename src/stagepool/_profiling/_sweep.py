"""The sweep: every planned configuration run through a real Engine, while a thread samples the
workers; and the confirmation run of the recommended ``Engine(**kwargs)``.

Each run starts a fresh Engine (a worker's history changes its speed), warms it up, maps the
items with a fixed chunk size and becomes a ``SweepRun``; the fastest of its rounds counts. The
``Sampler`` reads CPU % and RSS of the engine's workers meanwhile; a run whose workers did not
get the CPU they should have (other processes took it) is adjusted for that, and run once more
when every round of it was disturbed.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._engine import Engine
from .._planning import count_of
from .._resources import cpu_rss_sampler
from ._measured import SAMPLE_INTERVAL, SerialPass, Spread, SweepRun, WorkerSample, cpu_ratio
from ._plan import SweepPlan, distinct_pool, engine_options, items_per_run
from ._text import Say, run_line

__all__ = ["Sampler", "confirm", "engine_at", "sweep"]

# Adjusted throughput never credits a run with more than twice what it measured.
MIN_CPU_SHARE = 0.5
# A run whose workers got less than this share of the CPU they should have used while inside
# items was disturbed by other processes (see _disturbed).
DISTURBED_SHARE = 0.8


class Sampler:
    """A thread reading CPU % and RSS of the watched engine's workers every SAMPLE_INTERVAL.

    It sleeps on an Event between readings and reads two small /proc files per worker, so it
    costs well under 1 % of one CPU; that cost is measured (``cpu_seconds``) and reported.
    """

    def __init__(self, t0: float, interval: float = SAMPLE_INTERVAL) -> None:
        self.t0, self.interval = t0, interval
        self.samples: list[WorkerSample] = []
        self.cpu_seconds = self.wall = self._started = 0.0
        self._read = cpu_rss_sampler()
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._label: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stagepool-profile-sampler",
                                        daemon=True)

    def __enter__(self) -> Sampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.wall = time.perf_counter() - self._started

    @property
    def cpu_share(self) -> float:
        """CPU time of the sampler thread over its lifetime, as a share of one CPU."""
        return self.cpu_seconds / max(self.wall, 1e-9)

    def watch(self, engine: Engine | None, label: str | None = None) -> None:
        with self._lock:
            self._engine, self._label = engine, label

    def _loop(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            with self._lock:
                engine, label = self._engine, self._label
            if engine is None:
                continue
            now = time.perf_counter() - self.t0
            for pid, cpu, rss in self._read(engine.worker_pids()):
                self.samples.append(WorkerSample(now, label, pid, cpu, rss))
            self.cpu_seconds = time.thread_time() - start


def sweep(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass, plan: SweepPlan,
          say: Say, sampler: Sampler) -> list[SweepRun]:
    """Every (workers, chunk size) ``plan.repeat`` times; the fastest round of each counts.

    Each round goes over all configurations, in reverse order every other round, so that a burst
    of other load or a slow drift hits every configuration alike rather than one of them. Every
    run has a fresh engine (see ``_fresh_run``); no more workers are alive than the largest count.
    A configuration whose every round was disturbed (see ``_disturbed``) runs once more; its
    throughput is also adjusted for the CPU it did not get (see ``_with_samples``).
    """
    total = len(plan.counts) * len(plan.sizes) * plan.repeat
    say(f"sweep: {len(plan.counts)} worker counts {list(plan.counts)} x {len(plan.sizes)} chunk "
        f"sizes {list(plan.sizes)} x {plan.repeat} rounds, ~{plan.run_seconds:g} s each (about "
        f"{total * plan.run_seconds:.0f} s plus pool starts)")
    pool = distinct_pool(good, max(plan.sizes), serial)
    done: dict[tuple[int, int], list[SweepRun]] = {}

    def measure(workers: int, chunk: int, label: str) -> None:
        n = items_per_run(serial, workers, chunk, plan.run_seconds)
        step = f"[{sum(map(len, done.values())) + 1}/{total}]"
        say.tick(f"{step} {count_of(workers, 'worker')}, chunk {chunk}, {n} items ...")
        run = _fresh_run(fn, good, pool, n, workers, chunk, label, serial, sampler, plan)
        done.setdefault((workers, chunk), []).append(run)
        say(f"{step} {run_line(run)}{' (disturbed)' if _disturbed(run, serial) else ''}")

    for round_ in range(plan.repeat):
        if round_ and _late(plan):  # one full round always; more only within the budget
            say(f"time budget: {round_} of {plan.repeat} rounds")
            break
        flip = -1 if round_ % 2 else 1
        for workers in plan.counts[::flip]:
            for chunk in plan.sizes[::flip]:
                measure(workers, chunk, f"w{workers} c{chunk} r{round_ + 1}")
    for (workers, chunk), runs in list(done.items()):
        if all(_disturbed(r, serial) for r in runs) and not _late(plan):
            total += 1
            measure(workers, chunk, f"w{workers} c{chunk} r{len(runs) + 1}")
    return [_fastest(done[(w, c)]) for w in plan.counts for c in plan.sizes]


def _late(plan: SweepPlan) -> bool:
    """Past the profile's deadline (the sweep and the confirmation then stop adding runs)."""
    return plan.deadline is not None and time.perf_counter() > plan.deadline


def _disturbed(run: SweepRun, serial: SerialPass) -> bool:
    """Did other processes take the CPUs from this run's workers? (See ``_cpu_share``.)"""
    return run.cpu_share is not None and run.cpu_share < DISTURBED_SHARE


def _fresh_run(fn: Callable[[Any], Any], good: list[Any], pool: list[Any], n: int, workers: int,
               chunk: int, label: str, serial: SerialPass, sampler: Sampler,
               plan: SweepPlan) -> SweepRun:
    """One run in an engine of its own, as ``Engine(workers=..., chunk_size=...)`` would start.

    Not one engine per worker count reused across chunk sizes: a worker's history changes its
    speed. After one big chunk, glibc's malloc raises its mmap threshold for good and the stage's
    large temporary arrays stop costing page faults (a third of the demo stage's time here), so a
    small chunk size measured after a big one would look faster than it ever is on its own.
    """
    with engine_at(plan.where, workers=workers, **engine_options(plan.threads)) as engine:
        sampler.watch(engine)
        _warm_up(engine, fn, good, workers)
        run = _timed_run(engine, fn, pool, n, chunk, label, serial, sampler)
        sampler.watch(None)
    return _with_samples(run, list(sampler.samples), serial)


def engine_at(where: Mapping[str, Any], **kwargs: Any) -> Engine:
    """``Engine(**kwargs)`` where the sweep runs (``SweepPlan.where``); a cluster at an address
    brings its own workers, so ``workers`` is left to it (the plan has its count only)."""
    if where.get("address") is not None:
        kwargs.pop("workers", None)
    return Engine(**kwargs, **where)


def on_cluster(plan: SweepPlan) -> SweepPlan:
    """``plan`` for a cluster at an address (``plan.where``): its size is the one worker count,
    and none of this machine's bounds or notes (CPUs, memory) apply; unchanged without one."""
    if plan.where.get("address") is None:
        return plan
    with engine_at(plan.where) as probe:
        workers, cluster = probe.workers, probe.plan.detail.removeprefix("limited by cluster, ")
    return dataclasses.replace(plan, counts=(workers,), bound="cluster", cluster=cluster, notes=())


def _fastest(rounds: Sequence[SweepRun]) -> SweepRun:
    best = max(rounds, key=lambda r: r.adjusted)
    return dataclasses.replace(best, rounds=tuple(r.throughput for r in rounds))


def _warm_up(engine: Engine, fn: Callable[[Any], Any], good: list[Any], workers: int) -> None:
    """A few items per worker first: imports, caches and first-call costs stay out of the runs."""
    items = [good[i % len(good)] for i in range(2 * workers)]
    engine.map(fn, items, chunk_size=1)


def _timed_run(engine: Engine, fn: Callable[[Any], Any], pool: list[Any], n: int, chunk: int,
               label: str, serial: SerialPass, sampler: Sampler) -> SweepRun:
    workers = engine.workers
    items = [pool[i % len(pool)] for i in range(n)]
    sampler.watch(engine, label)
    start = time.perf_counter() - sampler.t0
    report = engine.map(fn, items, chunk_size=chunk)
    end = time.perf_counter() - sampler.t0
    sampler.watch(engine)
    stats = report.stats
    wall = max(stats.wall_time, 1e-9)
    ok = len(report) - len(report.failed)
    throughput = ok / wall
    speedup = throughput * serial.wall.mean
    step = max(1, len(report) // 4096)
    picked = (report[i] for i in range(0, len(report), step))
    durations = Spread.of(outcome.duration for outcome in picked if outcome.ok)
    return SweepRun(
        workers=workers, chunk_size=chunk, items=n, ok=ok, wall=wall, busy=stats.busy_time,
        throughput=throughput, speedup=speedup, efficiency=speedup / workers,
        ipc_share=max(0.0, (wall * workers - stats.busy_time) / (wall * workers)),
        durations=durations, cpu_percent=None, peak_rss=None, started=start, ended=end,
        label=label, adjusted=throughput)


def _with_samples(run: SweepRun, samples: Sequence[WorkerSample], serial: SerialPass) -> SweepRun:
    """The run with its sampled CPU % and peak RSS, and its throughput adjusted for the CPU its
    workers did not get (see ``_cpu_share``)."""
    mine = [s for s in samples if s.run == run.label]
    cpus = [s.cpu_percent for s in mine if s.cpu_percent is not None]
    rss = [s.rss for s in mine if s.rss is not None]
    run = dataclasses.replace(run, cpu_percent=statistics.fmean(cpus) if cpus else None,
                              peak_rss=max(rss) if rss else None)
    share = _cpu_share(run, serial)
    adjusted = run.throughput / max(MIN_CPU_SHARE, share) if share is not None else run.throughput
    return dataclasses.replace(run, cpu_share=share, adjusted=max(run.throughput, adjusted))


def _cpu_share(run: SweepRun, serial: SerialPass) -> float | None:
    """CPU the workers got while inside items / what the stage uses alone, capped at 1.

    For a CPU-bound stage (CPU/wall near 1 in the serial pass) a worker inside an item uses a
    whole CPU; when the sampled CPU % is under the share of time spent inside items, other
    processes had the CPUs. None for stages that wait, or without samples.
    """
    ratio = cpu_ratio(serial)
    if ratio is None or ratio < 0.8 or run.cpu_percent is None:
        return None
    inside = run.busy / max(run.wall * run.workers, 1e-9)
    if inside <= 0:
        return None
    return min(1.0, run.cpu_percent / 100 / (inside * min(1.0, ratio)))


def confirm(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass, plan: SweepPlan,
            kwargs: dict[str, Any], label: str, sampler: Sampler) -> SweepRun:
    """Run ``Engine(**kwargs)`` exactly as configured (with the profile's thread budget),
    measured like a sweep run; past the deadline, one round only."""
    workers, chunk = kwargs["workers"], kwargs["chunk_size"]
    pool = distinct_pool(good, chunk, serial)
    n = items_per_run(serial, workers, chunk, plan.run_seconds)
    with engine_at(plan.where, **kwargs, **engine_options(plan.threads)) as engine:
        sampler.watch(engine)
        _warm_up(engine, fn, good, workers)
        rounds: list[SweepRun] = []
        while not rounds or (not _late(plan) and (len(rounds) < plan.repeat or (
                all(_disturbed(r, serial) for r in rounds) and len(rounds) == plan.repeat))):
            run = _timed_run(engine, fn, pool, n, chunk, f"{label} r{len(rounds) + 1}", serial,
                             sampler)
            rounds.append(_with_samples(run, list(sampler.samples), serial))
        sampler.watch(None)
    return _fastest(rounds)
