"""Planning the sweep (pure): which worker counts and chunk sizes to measure, and on how many items.

Every function here is a plain function of the serial pass and a ``ResourceSnapshot``, so it is
tested without processes. The worker counts stop at the tightest of the usable CPUs, the memory
budget (memory per task from the serial pass) and ``STAGEPOOL_MAX_WORKERS``.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Mapping
from typing import Any

from .._probe import pin_threads
from .._resources import THREAD_ENV_VARS, ResourceSnapshot
from .._worker import dumps
from ._measured import SerialPass

__all__ = [
    "SweepPlan",
    "chunk_candidates",
    "default_counts",
    "distinct_pool",
    "engine_options",
    "items_per_run",
    "mem_per_task",
    "plan_sweep",
    "profile_threads",
]

# The largest chunk worth trying holds this much work. The round trip (~0.1-1 ms) is under 1 % of
# a 50 ms chunk already, but a chunk's size also changes the worker's memory behaviour (a big
# chunk raises glibc's mmap threshold, and the stage's temporaries stop page-faulting: 33 % on the
# demo stage here), so sizes up to ~0.5 s of work are tried; the smallest near the best wins.
MAX_CHUNK_SECONDS = 0.5
# At most this many chunk sizes per worker count (spread geometrically): each costs one run.
MAX_CHUNK_CANDIDATES = 5
# Every worker gets at least this many chunks per run, or the tail dominates the measurement.
MIN_CHUNKS_PER_WORKER = 4
# Bounds the list a run maps over when items are tiny (8 MB of references; pickled in chunks).
MAX_RUN_ITEMS = 1_000_000
# Copies of the sample made so that no chunk holds the same object twice (pickle would send it
# once and understate the cost of shipping a chunk), up to this many bytes.
MAX_COPY_BYTES = 256 * 2**20
# Memory per task = (worker baseline + peak growth + a chunk's payload) x this, for what the sample
# did not show (a bigger item, fragmentation).
MEM_SAFETY = 1.25


@dataclasses.dataclass(frozen=True, slots=True)
class SweepPlan:
    """What the sweep measures: every count x every size, ``repeat`` rounds of ~run_seconds."""

    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    run_seconds: float
    repeat: int
    bound: str  # what capped the worker counts: cpu, memory, env, workers or cluster
    budget: int  # bytes the workers may use together
    budget_source: str
    usable_cpus: int
    notes: tuple[str, ...]
    threads: int = 1  # native threads per worker in every engine (see engine_options)
    deadline: float | None = None  # time.perf_counter() the profile should be done by
    # Where the engines run: {} (local workers), or Engine options naming a dask cluster
    # ({"backend": "dask"} for an in-process one, plus "address" for one that sizes itself).
    where: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cluster: str = ""  # that cluster, as its engine's plan says: "dask cluster at ..., 2 workers"


def engine_options(threads: int) -> dict[str, Any]:
    """Engine arguments that give every worker ``threads`` native threads (BLAS, OpenMP,
    worker_threads()): the serial pass, each sweep run and the confirmation all compare alike."""
    return {"initializer": pin_threads, "initargs": (threads, THREAD_ENV_VARS)}


def profile_threads(snapshot: ResourceSnapshot, counts: tuple[int, ...] | None) -> int:
    """The thread budget of the widest run (usable CPUs // its workers), for every run."""
    widest = max(counts) if counts else snapshot.usable_cpus
    return max(1, snapshot.usable_cpus // widest)


def chunk_candidates(per_item: float, *, limit: int = MAX_CHUNK_CANDIDATES) -> tuple[int, ...]:
    """Chunk sizes worth trying for items of ``per_item`` seconds: powers of two from 1 up to
    ~``MAX_CHUNK_SECONDS`` of work, thinned to ``limit`` geometrically spread sizes that always
    include 1 and the largest. (A run grows to give each worker MIN_CHUNKS_PER_WORKER chunks.)"""
    top = max(1, min(1 << 16, int(MAX_CHUNK_SECONDS / max(per_item, 1e-7))))
    powers = [1 << k for k in range(top.bit_length())]
    stride = max(1, math.ceil((len(powers) - 1) / max(1, limit - 1)))
    picked = sorted(set(powers[::-1][::stride]) | {1})
    return tuple(picked)


def default_counts(cap: int) -> tuple[int, ...]:
    if cap <= 8:
        return tuple(range(1, cap + 1))
    return tuple(sorted({1 << k for k in range(cap.bit_length()) if 1 << k < cap} | {cap}))


def mem_per_task(serial: SerialPass, chunk: int, sampled_growth: int = 0) -> int:
    """Bytes to reserve per worker: its own baseline, its peak growth, a chunk in and out."""
    payload = int(serial.bytes_in.max + serial.bytes_out.max)
    need = serial.worker_baseline_uss + max(serial.peak_growth, sampled_growth) + chunk * payload
    return _round_up_mib(need * MEM_SAFETY)


def _round_up_mib(n: float) -> int:
    """Round a byte count up to two significant digits in MiB (at least 1 MiB)."""
    mib = max(1.0, n / 2**20)
    step = 10 ** max(0, math.floor(math.log10(mib)) - 1)
    return int(math.ceil(mib / step) * step) * 2**20


def plan_sweep(serial: SerialPass, snapshot: ResourceSnapshot, *, budget: int | None,
               counts: tuple[int, ...] | None, sizes: tuple[int, ...] | None,
               run_seconds: float, repeat: int = 1) -> SweepPlan:
    available = snapshot.effective_mem_available
    source = "--mem-limit" if budget is not None else "available now"
    usable = min(budget, available) if budget is not None else available
    per_task = mem_per_task(serial, 1)
    bounds: list[tuple[str, int]] = [("cpu", snapshot.usable_cpus),
                                     ("memory", max(1, usable // per_task))]
    if snapshot.env_max_workers is not None:
        bounds.append(("env", snapshot.env_max_workers))
    bound, cap = min(bounds, key=lambda b: b[1])  # min() keeps the first of ties: cpu first
    notes: list[str] = []
    if counts is not None:  # as asked, CPUs may be oversubscribed, but memory is a hard limit
        hard_name, hard = min(((k, v) for k, v in bounds if k != "cpu"), key=lambda b: b[1])
        chosen = tuple(c for c in counts if c <= hard) or (1,)
        if len(chosen) < len(counts):
            bound = hard_name
            notes.append(f"worker counts over {hard} were left out: {hard_name} allows {hard}")
        else:
            bound = "cpu" if max(chosen) == snapshot.usable_cpus else "workers"
        if max(chosen) > snapshot.usable_cpus:
            notes.append(f"trying up to {max(chosen)} workers on {snapshot.usable_cpus} usable "
                         "CPUs, as asked: the CPUs are oversubscribed")
    else:
        chosen = default_counts(cap)
    per_item = max(serial.wall.mean, 1e-7)
    return SweepPlan(
        counts=chosen, sizes=sizes or chunk_candidates(per_item),
        run_seconds=run_seconds, repeat=repeat, bound=bound,
        budget=budget if budget is not None else available,
        budget_source=source, usable_cpus=snapshot.usable_cpus, notes=tuple(notes))


def items_per_run(serial: SerialPass, workers: int, chunk: int, run_seconds: float) -> int:
    """Items for a run of about ``run_seconds``: each costs its time plus 1/chunk of a round trip,
    spread over the workers; never fewer than MIN_CHUNKS_PER_WORKER chunks per worker."""
    per_item = (serial.wall.mean + serial.overhead / chunk) / workers
    n = math.ceil(run_seconds / max(per_item, 1e-8))
    return int(min(MAX_RUN_ITEMS, max(n, MIN_CHUNKS_PER_WORKER * workers * chunk)))


def distinct_pool(items: list[Any], size: int, serial: SerialPass) -> list[Any]:
    """``items``, plus copies up to ``size`` objects, so no chunk of ``size`` repeats an object."""
    if size <= len(items):
        return items
    per_item = max(1.0, serial.bytes_in.mean)
    size = min(size, max(len(items), int(MAX_COPY_BYTES / per_item)))
    blobs = [dumps(item) for item in items]
    return items + [pickle.loads(blobs[i % len(blobs)]) for i in range(len(items), size)]
