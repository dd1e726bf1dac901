"""The recommendation (pure): ``Engine`` settings from the sweep's runs, each with its reason.

The fastest configuration within TOLERANCE of the best, with the fewest workers and then the
smallest chunk, wins; ``mem_per_task`` and ``timeout`` come from what the serial pass and the
sampler measured; ``limited_by`` names what stops more workers from paying. Plain functions of
the measurements: tested without processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .._config import format_size
from .._planning import count_of
from ._measured import SerialPass, SweepRun
from ._plan import MEM_SAFETY, SweepPlan, mem_per_task
from ._text import rate, secs

__all__ = [
    "TIMEOUT_COST",
    "Recommendation",
    "drop_timeout",
    "recommend",
    "recommend_cost_timeout",
    "recommend_timeout",
    "timeout_may_cost",
]

# Throughputs closer than this are a tie (run-to-run noise on a busy machine is a few per cent): a
# tie goes to fewer workers (less memory, CPUs left for the rest of the pipeline), then to smaller
# chunks (finer load balance at the tail of a batch, smoother progress, less data in flight).
TOLERANCE = 0.02
# Timeout = max(p99 x TIMEOUT_P99_FACTOR, slowest x TIMEOUT_SLOWEST_FACTOR, TIMEOUT_FLOOR). A
# timeout kills and respawns the worker, so it must only catch real hangs: never below a second,
# where a GC pause or a busy machine could trip it.
TIMEOUT_P99_FACTOR = 5.0
TIMEOUT_SLOWEST_FACTOR = 2.0
TIMEOUT_FLOOR = 1.0
# Workers idle this share of the time waiting for pickling and pipes: the parent is what limits,
# whatever the worker count.
IPC_BOUND = 0.5
# When Engine(**recommended) runs this much slower than the same configuration without the
# timeout did in the sweep, it is measured once more without it, and the timeout is dropped if
# that is this much faster: per-item clocking is what a timeout costs on tiny items.
TIMEOUT_COST = 0.10
# Items longer than this cannot lose TIMEOUT_COST to two clock reads each: not worth checking.
TIMED_ITEM_MAX_SECONDS = 20e-6


@dataclasses.dataclass(frozen=True, slots=True)
class Recommendation:
    """``Engine(**kwargs)``, one reason per key, and the sweep run it was taken from."""

    kwargs: dict[str, Any]
    reasons: dict[str, str]
    limited_by: str
    mem_per_task: int
    chosen: SweepRun


def recommend_timeout(p99: float, slowest: float) -> tuple[float, str]:
    """A per-item timeout from the duration distribution, and its reason.

    ``max(p99 x TIMEOUT_P99_FACTOR, slowest x TIMEOUT_SLOWEST_FACTOR, TIMEOUT_FLOOR)``, rounded up
    to two significant digits: always above the slowest item seen, so only a real hang trips it.
    """
    candidates = [(p99 * TIMEOUT_P99_FACTOR, f"p99 item {secs(p99)} x {TIMEOUT_P99_FACTOR:g}"),
                  (slowest * TIMEOUT_SLOWEST_FACTOR,
                   f"{TIMEOUT_SLOWEST_FACTOR:g} x the slowest sampled item ({secs(slowest)})"),
                  (TIMEOUT_FLOOR, f"the {TIMEOUT_FLOOR:g} s floor (a timeout kills and respawns "
                                  "the worker: below that, a GC pause or a busy machine trips it)")]
    value, why = max(candidates, key=lambda c: c[0])
    timeout = _round_up_2sig(value)
    others = "; ".join(text for v, text in candidates if text != why)
    return timeout, f"{timeout:g} s from {why} (also considered: {others})"


def recommend_cost_timeout(walls: Sequence[float], costs: Sequence[float],
                           ) -> tuple[dict[str, float], str] | None:
    """A timeout that grows with the item: ``floor + per_cost x cost(item)``, and its reason.

    ``per_cost`` is TIMEOUT_P99_FACTOR x the most seconds per cost unit any sampled item took
    (so each sampled item stays 5x inside its limit), rounded up; ``floor`` is TIMEOUT_FLOOR (a
    tiny item is not killed by a GC pause). None when no sampled item has a positive cost.
    """
    rates = [(wall / cost, cost) for wall, cost in zip(walls, costs, strict=True) if cost > 0]
    if not rates:
        return None
    per_unit, its_cost = max(rates)
    per_cost = _round_up_2sig(per_unit * TIMEOUT_P99_FACTOR)
    rule = {"floor": TIMEOUT_FLOOR, "per_cost": per_cost}
    return rule, (f"timeout(item) = {TIMEOUT_FLOOR:g} s + {per_cost:.3g} s x cost(item): "
                  f"{TIMEOUT_P99_FACTOR:g} x the most seconds per cost unit sampled "
                  f"({per_unit:.3g} s, an item of cost {its_cost:g}), plus the "
                  f"{TIMEOUT_FLOOR:g} s floor; Engine.from_profile(path, cost=...) applies it")


def _round_up_2sig(x: float) -> float:
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(round(math.ceil(x / step - 1e-9) * step, 10))


def recommend(runs: Sequence[SweepRun], serial: SerialPass, plan: SweepPlan) -> Recommendation:
    sampled = {c: max([0, *((r.peak_rss or 0) - serial.worker_baseline_rss
                            for r in runs if r.chunk_size == c)]) for c in plan.sizes}
    mem = {c: mem_per_task(serial, c, sampled.get(c, 0)) for c in plan.sizes}

    def fits(run: SweepRun) -> bool:
        return run.workers == 1 or run.workers * mem[run.chunk_size] <= plan.budget

    usable = [r for r in runs if r.ok > 0 and fits(r)] or [r for r in runs if r.ok > 0]
    if not usable:
        raise ValueError("no sweep run finished any item: every item failed in the engine")
    best = max(usable, key=lambda r: r.adjusted)
    near = [r for r in usable if r.adjusted >= best.adjusted * (1 - TOLERANCE)]
    chosen = min(near, key=lambda r: (r.workers, r.chunk_size))
    per_task = mem[chosen.chunk_size]
    limited_by = _limited_by(chosen, usable, plan)
    p99 = max(serial.wall.p99, chosen.durations.p99)
    slowest = max(serial.slowest, chosen.durations.max)
    timeout, timeout_reason = recommend_timeout(p99, slowest)
    kwargs: dict[str, Any] = {"workers": chosen.workers, "chunk_size": chosen.chunk_size,
                              "mem_per_task": f"{per_task // 2**20}MiB", "timeout": timeout}
    reasons = {
        "workers": _workers_reason(chosen, usable, limited_by, plan, per_task),
        "chunk_size": _chunk_reason(chosen, usable, serial),
        "mem_per_task": _mem_reason(serial, chosen, per_task, sampled.get(chosen.chunk_size, 0),
                                    plan),
        "timeout": timeout_reason,
    }
    return Recommendation(kwargs, reasons, limited_by, per_task, chosen)


def timeout_may_cost(rec: Recommendation, timed: SweepRun, serial: SerialPass) -> bool:
    """A per-item timeout makes the worker read the clock around every item (~0.1-0.5 us): on
    tiny items that shows. Worth a second confirmation without it when the timed one fell short;
    on longer items a shortfall is noise, not the timeout."""
    return (rec.kwargs.get("timeout") is not None
            and serial.wall.mean < TIMED_ITEM_MAX_SECONDS
            and timed.adjusted < rec.chosen.adjusted * (1 - TIMEOUT_COST))


def drop_timeout(rec: Recommendation, timed: SweepRun, untimed: SweepRun) -> Recommendation:
    timeout = rec.kwargs["timeout"]
    cost = 1 - timed.adjusted / untimed.adjusted
    reason = (f"None: with timeout={timeout:g} the engine clocks every item, which cost {cost:.0%} "
              f"of the throughput here ({timed.adjusted:.4g} vs {untimed.adjusted:.4g} "
              f"items/s; items take {secs(untimed.durations.mean)}); a hang still shows as a "
              f"stalled batch. If you want one anyway: {rec.reasons['timeout']}")
    return dataclasses.replace(rec, kwargs={**rec.kwargs, "timeout": None},
                               reasons={**rec.reasons, "timeout": reason})


def _limited_by(chosen: SweepRun, runs: Sequence[SweepRun], plan: SweepPlan) -> str:
    most = max(r.workers for r in runs)
    if chosen.workers >= most and plan.bound != "cpu":
        return plan.bound  # memory, env or the counts asked for: a hard stop, whatever else
    if chosen.ipc_share >= IPC_BOUND:
        return "ipc"
    if chosen.workers >= most:
        return "cpu"
    if chosen.workers >= plan.usable_cpus:
        return "cpu"
    at_most = [r for r in runs if r.workers == most]
    fastest = max(at_most, key=lambda r: r.adjusted)
    return "ipc" if fastest.ipc_share >= IPC_BOUND / 2 else "contention"


def _workers_reason(chosen: SweepRun, runs: Sequence[SweepRun], limited_by: str, plan: SweepPlan,
                    per_task: int) -> str:
    head = f"{chosen.workers}: {rate(chosen)} items/s at chunk {chosen.chunk_size}" + _gain_text(
        chosen, runs)
    if limited_by == "cluster":
        return f"{head}; limited by cluster: {plan.cluster} (its threads are the workers)"
    if limited_by == "memory":
        return (f"{head}; limited by memory: {format_size(plan.budget)} ({plan.budget_source}) / "
                f"{format_size(per_task)} per task allows {max(1, plan.budget // per_task)}")
    if limited_by == "cpu" and chosen.workers >= max(r.workers for r in runs):
        return f"{head}; limited by cpu: {plan.usable_cpus} usable CPUs, one worker each"
    if limited_by == "ipc" and chosen.workers >= max(r.workers for r in runs):
        return (f"{head}; limited by IPC: the workers wait {chosen.ipc_share:.0%} of the time for "
                "the parent to pickle and ship items and results: more workers cannot help, "
                "bigger items per call (or less data per item) can")
    if limited_by in ("env", "workers"):
        source = "STAGEPOOL_MAX_WORKERS" if limited_by == "env" else "the worker counts asked for"
        return f"{head}; more workers were not tried ({source})"
    more = [r for r in runs if r.workers > chosen.workers]
    faster = max(more, key=lambda r: r.adjusted)
    why = {"cpu": f"only {plan.usable_cpus} usable CPUs",
           "ipc": f"the parent cannot feed them: {faster.ipc_share:.0%} of worker time goes to "
                  "pickling and pipes",
           "contention": _contention_text(faster)}[limited_by]
    gain = faster.adjusted / chosen.adjusted - 1
    return (f"{head}; {faster.workers} workers reached {rate(faster)} items/s "
            f"({gain:+.0%}; gains under {TOLERANCE:.0%} count as noise): {why}")


def _gain_text(chosen: SweepRun, runs: Sequence[SweepRun]) -> str:
    """The chosen run against the best run with fewer workers, from the same adjusted figures
    the choice used (so the text cannot contradict it: more workers are chosen only when every
    smaller count fell more than TOLERANCE short of the best, so the ratio is above 1), and its
    parallel efficiency (throughput x
    serial seconds per item / workers; the serial pass ran with the same threads)."""
    fewer = [r for r in runs if r.workers < chosen.workers]
    text = f", parallel efficiency {chosen.efficiency:.2f}"
    if not fewer:
        return text
    base = max(fewer, key=lambda r: r.adjusted)
    gain = chosen.adjusted / max(base.adjusted, 1e-12)
    return (f", {gain:.2f}x the best run with fewer workers ({base.workers} at chunk "
            f"{base.chunk_size}: {rate(base)} items/s){text}")


def _contention_text(run: SweepRun) -> str:
    """Why more workers did not pay although the parent kept up: the CPUs, or each other."""
    busy = run.busy / max(run.wall * run.workers, 1e-9)  # share of the time inside an item
    if run.cpu_percent is not None and run.cpu_percent < 75 * busy:
        return (f"its workers got only {run.cpu_percent:.0f}% of a CPU each while busy "
                f"{busy:.0%} of the time: other processes were using the CPUs")
    return "items slow each other down when run side by side (memory bandwidth, caches, threads)"


def _chunk_reason(chosen: SweepRun, runs: Sequence[SweepRun], serial: SerialPass) -> str:
    same = sorted((r for r in runs if r.workers == chosen.workers), key=lambda r: r.chunk_size)
    top = max(same, key=lambda r: r.adjusted)
    table = ", ".join(f"{r.chunk_size}: {rate(r)}" for r in same)
    work = chosen.chunk_size * serial.wall.mean
    return (f"{chosen.chunk_size}: the smallest chunk within {TOLERANCE:.0%} of the best at "
            f"{count_of(chosen.workers, 'worker')} (chunk {top.chunk_size}: {rate(top)} items/s); "
            f"~{secs(work)} of work and {chosen.ipc_share:.0%} of worker time lost to IPC per "
            f"chunk; items/s by chunk size: {table}")


def _mem_reason(serial: SerialPass, chosen: SweepRun, per_task: int, sampled: int,
                plan: SweepPlan) -> str:
    growth = max(serial.peak_growth, sampled)
    source = "sampled in the sweep" if sampled > serial.peak_growth else "serial pass"
    payload = serial.bytes_in.max + serial.bytes_out.max
    fit = max(1, plan.budget // per_task)
    return (f"{format_size(per_task)}: (worker baseline {format_size(serial.worker_baseline_uss)} "
            f"USS + peak growth {format_size(growth)} ({source}; worst item "
            f"{format_size(serial.rss_growth.max)}) + {chosen.chunk_size} x "
            f"{format_size(payload)} of payload in and out) x {MEM_SAFETY:g}, rounded up; "
            f"{format_size(plan.budget)} ({plan.budget_source}) fits {fit} such workers")
