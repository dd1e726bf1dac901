"""How many workers the machine's resources buy, decided purely, and why (``stagepool plan``).

``plan_from_snapshot`` is a plain function of a :class:`ResourceSnapshot` (read once, in
``_resources``) and the caller's needs; its ``reason`` names the limit that won. ``choose_workers``
applies an explicit ``workers=`` and the ``STAGEPOOL_MAX_WORKERS`` ceiling to a plan.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from ._config import format_size, positive_size
from ._resources import (
    ENV_MAX_WORKERS,
    FDS_PER_WORKER,
    FDS_RESERVED,
    THREAD_ENV_VARS,
    ResourceSnapshot,
    check_field,
)
from ._threads import ENV_WORKER_THREADS

__all__ = ["LimitedBy", "WorkerPlan", "choose_workers", "cluster_plan", "count_of", "format_snapshot",
           "overcommit_warning",
           "plan_from_snapshot", "plan_workers"]

LimitedBy = Literal["cpu", "memory", "max_workers", "env", "cluster"]

# --------------------------------------------------------------------------------------------------
# Planning (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """How many workers to start, which limit decided it, and why (``str(plan)`` is the reason)."""

    workers: int
    cpus: int
    mem_available: int
    mem_per_task: int | None
    limited_by: LimitedBy
    reason: str
    snapshot: ResourceSnapshot
    reserve_cores: int = 0  # CPUs left to the caller: BLAS threads share the others

    def __str__(self) -> str:
        return self.reason

    @property
    def detail(self) -> str:
        """The reason without its leading worker count: "limited by cpu, 2 usable CPUs (...)"."""
        return self.reason.partition(": ")[2]

    def thread_env(self, environ: Mapping[str, str] | None = None, *,
                   workers: int | None = None) -> dict[str, str]:
        """Environment variables capping BLAS/OpenMP threads per worker at ``cpus // workers``
        (``workers`` defaults to the plan's; an engine told to run more passes its own count).

        Variables the user already set (non-empty) in ``environ`` (default ``os.environ``) are left
        out, so an explicit choice always wins. Never less than 1 thread. ``STAGEPOOL_WORKER_THREADS``
        (always there) is the budget ``stagepool.worker_threads()`` reports in a task.
        """
        env = os.environ if environ is None else environ
        cpus = max(1, self.cpus - self.reserve_cores)
        threads = str(max(1, cpus // (workers or self.workers)))
        budget = {name: threads for name in THREAD_ENV_VARS if not env.get(name)}
        # What worker_threads() answers in a task: the user's OpenMP choice, else the share.
        user = env.get("OMP_NUM_THREADS", "")
        budget[ENV_WORKER_THREADS] = user if user.isdigit() and int(user) >= 1 else threads
        return budget


def plan_from_snapshot(
    snapshot: ResourceSnapshot,
    *,
    mem_per_task: int | str | None = None,
    reserve_cores: int = 0,
    max_workers: int | None = None,
) -> WorkerPlan:
    """Decide the number of workers from ``snapshot`` alone (pure; see :func:`plan_workers`).

    The tightest of three bounds wins: usable CPUs minus ``reserve_cores``, effective available
    memory // ``mem_per_task`` (when given), and ``max_workers`` (when given); ties go to "cpu",
    then "memory", then "max_workers". At least one worker always runs. ``STAGEPOOL_MAX_WORKERS``
    (``snapshot.env_max_workers``) is one more maximum: it lowers the count when it is tighter
    (``limited_by == "env"``) and never raises it.
    """
    per_task = _validate_mem_per_task(mem_per_task)
    check_field("reserve_cores", reserve_cores, minimum=0)
    check_field("max_workers", max_workers, minimum=1, optional=True)

    bounds: list[tuple[LimitedBy, int]] = [("cpu", snapshot.usable_cpus - reserve_cores)]
    if per_task is not None:
        bounds.append(("memory", snapshot.effective_mem_available // per_task))
    if max_workers is not None:
        bounds.append(("max_workers", max_workers))
    limited_by, bound = min(bounds, key=lambda item: item[1])  # min() keeps the first of ties
    workers = max(1, bound)
    detail = _reason_detail(snapshot, limited_by, workers, per_task, reserve_cores)

    env_workers = snapshot.env_max_workers
    if env_workers is not None and env_workers < workers:  # a tie leaves the machine's reason
        detail = f"limited by {ENV_MAX_WORKERS}={env_workers} (without it {workers}: {detail})"
        workers, limited_by = env_workers, "env"
    return WorkerPlan(
        workers=workers,
        cpus=snapshot.usable_cpus,
        mem_available=snapshot.effective_mem_available,
        mem_per_task=per_task,
        limited_by=limited_by,
        reason=f"{_workers(workers)}: {detail}",
        snapshot=snapshot,
        reserve_cores=reserve_cores,
    )


def choose_workers(plan: WorkerPlan, requested: int | None) -> tuple[int, str]:
    """An engine's worker count, and a description of the choice for its ``repr`` (pure):
    ``(4, "4 workers (explicit; the machine plan allows 2: limited by cpu, ...)")``.

    ``requested`` None ("auto") takes ``plan.workers``. An explicit count is the user insisting:
    it may exceed the machine plan, but ``STAGEPOOL_MAX_WORKERS`` still caps it, since that
    variable is the operator's ceiling for every engine. Raises ``ValueError`` when the count
    needs more file descriptors than the process may open (``ulimit -n``).
    """
    ceiling = plan.snapshot.env_max_workers
    if requested is None:
        workers, how = plan.workers, f"auto: {plan.detail}"
    elif ceiling is not None and requested > ceiling:
        workers, how = ceiling, f"explicit {requested}, capped by {ENV_MAX_WORKERS}={ceiling}"
    else:
        workers = requested
        how = f"explicit; the machine plan allows {plan.workers}: {plan.detail}"
    _check_open_files(plan.snapshot, workers)
    return workers, f"{_workers(workers)} ({how})"


def cluster_plan(plan: WorkerPlan, threads: int, where: str) -> tuple[WorkerPlan, str]:
    """On a cluster the cluster decides (pure): its ``threads`` are the workers, ``where`` says
    which cluster. Returns the plan (``limited_by == "cluster"``) and the engine's ``repr`` text."""
    reason = f"{_workers(threads)}: limited by cluster, {where}"
    return (replace(plan, workers=threads, limited_by="cluster", reason=reason),
            f"{_workers(threads)} (dask: {where})")


def _check_open_files(snapshot: ResourceSnapshot, workers: int) -> None:
    """Refuse a worker count the process cannot open the files for: past the limit, spawning
    fails deep inside loky with the workers already started left running."""
    limit = snapshot.open_files_limit
    need = workers * FDS_PER_WORKER + FDS_RESERVED
    if limit is not None and need > limit:
        raise ValueError(
            f"workers={workers} needs about {need} file descriptors ({FDS_PER_WORKER} per worker "
            f"+ {FDS_RESERVED}), but this process may open only {limit} (ulimit -n); raise the "
            f"limit or use fewer workers"
        )


def overcommit_warning(plan: WorkerPlan, workers: int) -> str | None:
    """Why ``workers`` tasks of ``plan.mem_per_task`` do not fit where the plan says fewer do, or
    None when they fit (or no ``mem_per_task`` was given); pure."""
    per_task = plan.mem_per_task
    if per_task is None:
        return None
    fits = max(1, plan.mem_available // per_task)  # the plan's own memory bound
    if workers <= fits:
        return None
    need, have = _same_unit(workers * per_task, plan.mem_available)
    where = " under the cgroup limit" if plan.snapshot.memory_limited_by_cgroup else ""
    return (
        f"workers={workers} x mem_per_task={format_size(per_task)} needs {need}, but {have} is "
        f"available{where}: memory allows {_workers(fits)}. Starting {workers} anyway risks "
        f"swapping or the OOM killer; use workers='auto', fewer workers or a smaller mem_per_task"
    )


def plan_workers(
    *,
    mem_per_task: int | str | None = None,
    reserve_cores: int = 0,
    max_workers: int | None = None,
    snapshot: ResourceSnapshot | None = None,
) -> WorkerPlan:
    """Plan the worker count for this machine (or for ``snapshot``, when given).

    Reads :meth:`ResourceSnapshot.read` once when ``snapshot`` is None, then applies
    :func:`plan_from_snapshot`. Raises ``ValueError``/``TypeError`` naming the argument for bad
    arguments, and ``ValueError`` for a malformed ``STAGEPOOL_MAX_WORKERS``.

    Example::

        >>> plan = plan_workers(mem_per_task="1.5GiB", reserve_cores=1)
        >>> plan.workers >= 1
        True
        >>> print(plan)  # doctest: +SKIP
        2 workers: limited by memory, 3.1 GiB available / 1.5 GiB per task
    """
    if snapshot is None:
        snapshot = ResourceSnapshot.read()
    return plan_from_snapshot(
        snapshot, mem_per_task=mem_per_task, reserve_cores=reserve_cores, max_workers=max_workers
    )


def _validate_mem_per_task(mem_per_task: int | str | None) -> int | None:
    return None if mem_per_task is None else positive_size(mem_per_task, "mem_per_task")


def _reason_detail(
    snapshot: ResourceSnapshot,
    limited_by: LimitedBy,
    workers: int,
    mem_per_task: int | None,
    reserve_cores: int,
) -> str:
    if limited_by == "cpu":
        detail = f"limited by cpu, {_cpu_reason(snapshot, reserve_cores)}"
    elif limited_by == "memory":
        assert mem_per_task is not None
        detail = f"limited by memory, {_memory_reason(snapshot, mem_per_task)}"
    else:
        detail = f"limited by max_workers={workers}"
    if reserve_cores and limited_by != "cpu":
        detail += f" (reserve_cores={reserve_cores})"
    return detail


def _cpu_reason(snapshot: ResourceSnapshot, reserve_cores: int) -> str:
    usable = snapshot.usable_cpus
    sources = (
        f"logical {snapshot.logical_cpus}, affinity {_or_none(snapshot.affinity_cpus)}, "
        f"cgroup quota {_or_none(snapshot.cgroup_cpu_quota)}"
    )
    if not reserve_cores:
        return f"{count_of(usable, 'usable CPU')} ({sources})"
    detail = f"{count_of(usable, 'usable CPU')} minus reserve_cores={reserve_cores} ({sources})"
    if usable <= reserve_cores:
        detail += ": no CPU left, running 1 worker anyway"
    return detail


def _memory_reason(snapshot: ResourceSnapshot, mem_per_task: int) -> str:
    available = snapshot.effective_mem_available
    have, need = _same_unit(available, mem_per_task)
    where = ""
    if snapshot.memory_limited_by_cgroup:
        where = (
            f" under the cgroup limit ({format_size(snapshot.cgroup_mem_limit or 0)} limit, "
            f"{format_size(snapshot.cgroup_mem_usage or 0)} used)"
        )
    if available < mem_per_task:
        return (
            f"memory is insufficient: only {have} available{where} "
            f"for {need} per task: running 1 worker anyway"
        )
    return f"{have} available{where} / {need} per task"


_BINARY_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _same_unit(*sizes: int) -> list[str]:
    """Format sizes in the unit of the largest, so "0.8 GiB for 1.0 GiB" compares at a glance."""
    unit = format_size(max(sizes)).split()[-1]
    scale = _BINARY_UNITS[unit]
    if scale == 1:
        return [f"{size} B" for size in sizes]
    return [f"{size / scale:.1f} {unit}" for size in sizes]


def _workers(n: int) -> str:
    return count_of(n, "worker")


def count_of(n: int, noun: str) -> str:
    """"1 worker", "2 workers": every count in a plan or report text agrees with its noun."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _or_none(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


# --------------------------------------------------------------------------------------------------
# Human description (``stagepool plan``)
# --------------------------------------------------------------------------------------------------


def format_snapshot(snapshot: ResourceSnapshot) -> str:
    """Describe ``snapshot`` for humans, one topic per line (used by ``stagepool plan``)."""
    s = snapshot
    limit = "none" if s.cgroup_mem_limit is None else format_size(s.cgroup_mem_limit)
    usage = "unknown" if s.cgroup_mem_usage is None else format_size(s.cgroup_mem_usage)
    source = " (cgroup limit)" if s.memory_limited_by_cgroup else ""
    version = "none" if s.cgroup_version is None else f"v{s.cgroup_version}"
    env = "not set" if s.env_max_workers is None else str(s.env_max_workers)
    return "\n".join(
        [
            f"CPUs:    logical {s.logical_cpus}, affinity {_or_none(s.affinity_cpus)}, "
            f"cgroup quota {_or_none(s.cgroup_cpu_quota)} -> usable {s.usable_cpus}",
            f"Memory:  total {format_size(s.mem_total)}, available {format_size(s.mem_available)}, "
            f"cgroup limit {limit}, cgroup usage {usage} "
            f"-> effective {format_size(s.effective_mem_available)}{source}",
            f"cgroup:  {version}",
            f"{ENV_MAX_WORKERS}: {env}",
        ]
    )


# Public classes name the package they are imported from, in reprs and tracebacks.
WorkerPlan.__module__ = "stagepool"
