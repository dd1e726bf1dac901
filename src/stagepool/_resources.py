"""What the machine offers, read once; how many workers that buys, decided purely.

This is the only module of the package that imports psutil or reads ``/proc`` and
``/sys/fs/cgroup``. Everything else gets plain data:

```
/proc/self/cgroup ----\
/sys/fs/cgroup/...  ---+--> ResourceSnapshot.read() --> ResourceSnapshot (frozen, plain data)
psutil, os, environ --/                                        |
                                                               v
             mem_per_task, reserve_cores, max_workers --> plan_from_snapshot() --> WorkerPlan
                                                          (pure: workers, limited_by, reason)
```

Reading never raises because of a missing or odd cgroup: an absent or unreadable file means "no
limit". The one thing that does raise is a malformed ``STAGEPOOL_MAX_WORKERS``, because a typo in
an operator's ceiling should not be silently ignored. That variable is a maximum: it lowers a
worker count, never raises one.

The small process helpers at the end (``process_tree_pids``, ``rss_of``, ``kill_tree``, and the
profiler's ``cpu_rss_sampler`` and ``uss_of``) live here so that psutil stays in one module. (What
the profiler reads inside a worker, without psutil, is in ``_probe``.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

import psutil

from ._config import MAX_BYTES, format_size, positive_size

__all__ = [
    "ENV_MAX_WORKERS",
    "THREAD_ENV_VARS",
    "LimitedBy",
    "ProcessSample",
    "ResourceSnapshot",
    "WorkerPlan",
    "choose_workers",
    "cluster_plan",
    "cpu_rss_sampler",
    "format_snapshot",
    "kill_tree",
    "overcommit_warning",
    "plan_from_snapshot",
    "plan_workers",
    "process_tree_pids",
    "rss_of",
    "uss_of",
]

ENV_MAX_WORKERS = "STAGEPOOL_MAX_WORKERS"

# Native thread pools that each worker would otherwise size to the whole machine: N workers x N
# BLAS threads oversubscribes the CPUs and is usually slower than one thread per worker.
THREAD_ENV_VARS: tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712); anything this
# large cannot be a real limit on any machine we run on.
_UNLIMITED_BYTES = MAX_BYTES
_DEFAULT_CFS_PERIOD_US = 100_000

# A worker costs the parent 3 descriptors for as long as it lives (its pipe, its stderr pipe, its
# process sentinel) and one more while it is being spawned; the reserve is for the process's own
# files, the pool thread's wake-up pipe and shared memory segments being opened.
FDS_PER_WORKER = 4
FDS_RESERVED = 64

LimitedBy = Literal["cpu", "memory", "max_workers", "env", "cluster"]


# --------------------------------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """CPU, memory and open-file limits of this process, read once by :meth:`read`, then pure data.

    Build one by hand in tests: every field is a plain value and the properties only compute.
    """

    logical_cpus: int
    affinity_cpus: int | None
    cgroup_version: int | None
    cgroup_cpu_quota: float | None
    mem_total: int
    mem_available: int
    cgroup_mem_limit: int | None
    cgroup_mem_usage: int | None
    env_max_workers: int | None
    open_files_limit: int | None = None  # soft RLIMIT_NOFILE; None: unlimited or unknown

    def __post_init__(self) -> None:
        _check_int("logical_cpus", self.logical_cpus, minimum=1)
        _check_int("affinity_cpus", self.affinity_cpus, minimum=1, optional=True)
        _check_int("env_max_workers", self.env_max_workers, minimum=1, optional=True)
        _check_int("open_files_limit", self.open_files_limit, minimum=0, optional=True)
        _check_int("mem_total", self.mem_total, minimum=0)
        _check_int("mem_available", self.mem_available, minimum=0)
        _check_int("cgroup_mem_limit", self.cgroup_mem_limit, minimum=0, optional=True)
        _check_int("cgroup_mem_usage", self.cgroup_mem_usage, minimum=0, optional=True)
        if self.cgroup_version not in (None, 1, 2):
            raise ValueError(f"cgroup_version must be 1, 2 or None, got {self.cgroup_version!r}")
        quota = self.cgroup_cpu_quota
        if quota is not None and not quota > 0:
            raise ValueError(f"cgroup_cpu_quota must be > 0 or None, got {quota!r}")

    @property
    def usable_cpus(self) -> int:
        """CPUs this process may really use: the tightest of count, affinity and cgroup quota.

        A fractional quota rounds down (1.5 CPUs gives 1): the second worker would only be
        throttled. Never less than 1.
        """
        bounds: list[float] = [self.logical_cpus]
        if self.affinity_cpus is not None:
            bounds.append(self.affinity_cpus)
        if self.cgroup_cpu_quota is not None:
            bounds.append(self.cgroup_cpu_quota)
        return max(1, math.floor(min(bounds)))

    @property
    def cgroup_mem_headroom(self) -> int | None:
        """Bytes left under the cgroup memory limit (>= 0), or None without a limit."""
        if self.cgroup_mem_limit is None:
            return None
        return max(0, self.cgroup_mem_limit - (self.cgroup_mem_usage or 0))

    @property
    def effective_mem_available(self) -> int:
        """Memory new work can use: the machine's available memory capped by the cgroup headroom."""
        headroom = self.cgroup_mem_headroom
        if headroom is None:
            return self.mem_available
        return min(self.mem_available, headroom)

    @property
    def memory_limited_by_cgroup(self) -> bool:
        """True when the cgroup headroom, not the machine, bounds ``effective_mem_available``."""
        headroom = self.cgroup_mem_headroom
        return headroom is not None and headroom < self.mem_available

    @classmethod
    def read(
        cls,
        *,
        proc_root: str | os.PathLike[str] = "/proc",
        cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
        environ: Mapping[str, str] | None = None,
        logical_cpus: int | None = None,
        affinity_cpus: int | None = None,
        mem_total: int | None = None,
        mem_available: int | None = None,
    ) -> ResourceSnapshot:
        """Read the machine once: os, psutil, the cgroup files, the open-files limit and
        ``STAGEPOOL_MAX_WORKERS``.

        ``proc_root`` and ``cgroup_root`` let tests point at fake trees. The keyword overrides
        (``logical_cpus``, ``affinity_cpus``, ``mem_total``, ``mem_available``) replace the value
        os/psutil would report; ``None`` (the default) reads it for real. ``environ`` defaults to
        ``os.environ``.

        Missing or unreadable cgroup files mean "no limit" and never raise. Raises ``ValueError``
        when ``STAGEPOOL_MAX_WORKERS`` is set but is not an integer >= 1.
        """
        env = os.environ if environ is None else environ
        env_max_workers = _parse_env_max_workers(env)  # first: a bad override fails fast
        cgroup = _read_cgroup(Path(proc_root), Path(cgroup_root))
        if mem_total is None or mem_available is None:
            vm = psutil.virtual_memory()
            mem_total = int(vm.total) if mem_total is None else mem_total
            mem_available = int(vm.available) if mem_available is None else mem_available
        return cls(
            logical_cpus=_read_logical_cpus() if logical_cpus is None else logical_cpus,
            affinity_cpus=_read_affinity_cpus() if affinity_cpus is None else affinity_cpus,
            cgroup_version=cgroup.version,
            cgroup_cpu_quota=cgroup.cpu_quota,
            mem_total=mem_total,
            mem_available=mem_available,
            cgroup_mem_limit=cgroup.mem_limit,
            cgroup_mem_usage=cgroup.mem_usage,
            env_max_workers=env_max_workers,
            open_files_limit=_read_open_files_limit(),
        )


def _check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Reading os, psutil and the environment
# --------------------------------------------------------------------------------------------------


def _read_logical_cpus() -> int:
    return os.cpu_count() or 1  # None on exotic platforms: assume one CPU rather than fail


def _read_affinity_cpus() -> int | None:
    """CPUs in this process's affinity mask, or None where the OS does not expose one (macOS)."""
    try:
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0)) or None
        return len(psutil.Process().cpu_affinity()) or None  # Windows, FreeBSD
    except (AttributeError, OSError, psutil.Error):
        return None


def _read_open_files_limit() -> int | None:
    """The soft limit on open file descriptors, or None when unlimited or unknown (Windows)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on this platform
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _parse_env_max_workers(environ: Mapping[str, str]) -> int | None:
    """``STAGEPOOL_MAX_WORKERS`` as an int >= 1; unset or empty means no override."""
    raw = environ.get(ENV_MAX_WORKERS)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{ENV_MAX_WORKERS} must be an integer >= 1, got {raw!r}; "
            f"fix or unset the environment variable"
        )
    return value


# --------------------------------------------------------------------------------------------------
# Reading cgroups (v1 and v2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CgroupLimits:
    version: int | None = None
    cpu_quota: float | None = None
    mem_limit: int | None = None
    mem_usage: int | None = None


def _read_cgroup(proc_root: Path, cgroup_root: Path) -> _CgroupLimits:
    """Find this process's cgroups in ``{proc_root}/self/cgroup`` and read their effective limits.

    A limit set on any ancestor binds the process as much as one on its own cgroup (a job in a
    child of a 1.5 GiB slice has 1.5 GiB), so each controller is read from the process's cgroup
    up to the mount root: the smallest CPU quota, and the memory level with the least headroom.
    """
    text = _read_text(proc_root / "self" / "cgroup")
    if text is None:
        return _CgroupLimits()
    v1_paths: dict[str, tuple[str, str]] = {}  # controller -> (hierarchy dir name, cgroup path)
    v2_path: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2_path = path
        for controller in controllers.split(","):
            if controller in ("cpu", "memory"):
                v1_paths[controller] = (controllers, path)
    # Hybrid hosts list both v1 controllers and an empty "0::/" line; the limits then live in v1.
    if v1_paths:
        return _read_cgroup_v1(cgroup_root, v1_paths)
    if v2_path is not None:
        return _read_cgroup_v2(_cgroup_levels(cgroup_root, v2_path))
    return _CgroupLimits()


def _cgroup_levels(root: Path, path: str) -> list[Path]:
    """The directory of cgroup ``path`` under the mount ``root`` and its ancestors, leaf first,
    ending with ``root``.

    Only ``[root]`` when that directory is absent: inside a container, /proc/self/cgroup shows the
    host-side path while the container's own cgroup is mounted at the root (its ancestors are not
    visible; cgroup v1's ``hierarchical_memory_limit`` still accounts for them).
    """
    parts = PurePosixPath(path).relative_to("/").parts if path.startswith("/") else ()
    if not parts or ".." in parts or not root.joinpath(*parts).is_dir():
        return [root]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_cgroup_v2(levels: list[Path]) -> _CgroupLimits:
    leaf_usage = _read_int(levels[0] / "memory.current")
    limit, usage = _tightest_memory(
        leaf_usage,
        [(_read_int(d / "memory.max"), _read_int(d / "memory.current")) for d in levels],
    )
    return _CgroupLimits(
        version=2,
        cpu_quota=_smallest(_parse_cpu_max(_read_text(d / "cpu.max")) for d in levels),
        mem_limit=limit,
        mem_usage=usage,
    )


def _read_cgroup_v1(root: Path, paths: Mapping[str, tuple[str, str]]) -> _CgroupLimits:
    cpu_quota = mem_limit = mem_usage = None
    if "cpu" in paths:
        controllers, path = paths["cpu"]
        # The mount point is named after the co-mounted controllers; "cpu" is usually a symlink.
        for name in dict.fromkeys((controllers, "cpu,cpuacct", "cpu")):
            if (root / name).is_dir():
                cpu_quota = _smallest(
                    _cpu_quota(_read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us"))
                    for d in _cgroup_levels(root / name, path)
                )
                break
    if "memory" in paths:
        levels = _cgroup_levels(root / "memory", paths["memory"][1])
        leaf_usage = _read_int(levels[0] / "memory.usage_in_bytes")
        candidates = [(_read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes"))
                      for d in levels]
        # The kernel's own minimum over every ancestor, including those outside our view.
        candidates.append((_v1_hierarchical_limit(levels[0]), leaf_usage))
        mem_limit, mem_usage = _tightest_memory(leaf_usage, candidates)
    return _CgroupLimits(1, cpu_quota, mem_limit, mem_usage)


def _v1_hierarchical_limit(directory: Path) -> int | None:
    """``hierarchical_memory_limit`` from a v1 ``memory.stat``: the smallest limit on the path."""
    for line in (_read_text(directory / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "hierarchical_memory_limit":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _tightest_memory(
    leaf_usage: int | None, levels: Iterable[tuple[int | None, int | None]]
) -> tuple[int | None, int | None]:
    """The (limit, usage) of the level with the least headroom; (None, leaf usage) if none has a
    limit.

    The least headroom, not the lowest limit: a parent's higher limit binds first when its other
    children use most of it. A level whose usage is unknown is charged the leaf's usage, which
    its own usage includes.
    """
    limited = [(limit, leaf_usage if usage is None else usage)
               for limit, usage in levels if _limit_or_none(limit) is not None]
    if not limited:
        return None, leaf_usage
    return min(limited, key=lambda level: (level[0] or 0) - (level[1] or 0))  # first of ties: leaf


def _smallest(values: Iterable[float | None]) -> float | None:
    """The smallest known value (a CPU quota), or None when no level sets one."""
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") as a number of CPUs."""
    if text is None:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else _DEFAULT_CFS_PERIOD_US
    except ValueError:
        return None
    return _cpu_quota(quota, period)


def _cpu_quota(quota: int | None, period: int | None) -> float | None:
    """quota / period in CPUs; None when unlimited (v1 writes -1) or unknown."""
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _limit_or_none(limit: int | None) -> int | None:
    return None if limit is None or limit >= _UNLIMITED_BYTES else limit


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    """An integer file; None when missing, unreadable or not an integer ("max" reads as None)."""
    text = _read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


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
        out, so an explicit choice always wins. Never less than 1 thread.
        """
        env = os.environ if environ is None else environ
        threads = str(max(1, self.cpus // (workers or self.workers)))
        return {name: threads for name in THREAD_ENV_VARS if not env.get(name)}


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
    _check_int("reserve_cores", reserve_cores, minimum=0)
    _check_int("max_workers", max_workers, minimum=1, optional=True)

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
        return f"{_count(usable, 'usable CPU')} ({sources})"
    detail = f"{_count(usable, 'usable CPU')} minus reserve_cores={reserve_cores} ({sources})"
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
    return _count(n, "worker")


def _count(n: int, noun: str) -> str:
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


# --------------------------------------------------------------------------------------------------
# Process helpers (psutil stays in this module)
# --------------------------------------------------------------------------------------------------


def process_tree_pids(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (not ``pid`` itself); empty if it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def rss_of(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes; None if the process is gone (or not ours to read)."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_tree(pid: int, *, grace: float = 0.5) -> None:
    """SIGTERM ``pid`` and all its descendants, wait up to ``grace`` s, then SIGKILL survivors.

    Descendants are listed before anything is signalled: once the parent dies they are reparented
    and can no longer be found. Processes that are already gone are ignored. After the SIGKILL it
    waits up to ``grace`` again for them to exit, so the call returns within about ``2 * grace``.
    """
    if grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
    if pid == os.getpid():
        raise ValueError("kill_tree() refuses to kill the calling process")
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _signal_all(procs, kill=False)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    if alive:
        _signal_all(alive, kill=True)
        psutil.wait_procs(alive, timeout=grace)


def _signal_all(procs: list[psutil.Process], *, kill: bool) -> None:
    for proc in procs:
        try:
            if kill:
                proc.kill()
            else:
                proc.terminate()
        except psutil.NoSuchProcess:
            pass


# --------------------------------------------------------------------------------------------------
# Measurement helpers for the profiler (``_profiling/``), read from the parent; psutil stays here
# --------------------------------------------------------------------------------------------------

# (pid, CPU % since the previous sample of that pid or None on first sight, RSS bytes or None)
ProcessSample = tuple[int, float | None, int | None]


def cpu_rss_sampler() -> Callable[[Iterable[int]], list[ProcessSample]]:
    """A function that samples the CPU % and RSS of the pids it is given, cheaply, call after call.

    It keeps one ``psutil.Process`` per pid, so each call reads two small ``/proc`` files per pid
    (tens of microseconds) and CPU % covers the time since that pid's previous sample: on the first
    sight of a pid it is None. Pids that are gone are skipped and forgotten. Not thread-safe: one
    sampler per sampling thread.
    """
    procs: dict[int, psutil.Process] = {}

    def sample(pids: Iterable[int]) -> list[ProcessSample]:
        out: list[ProcessSample] = []
        for pid in pids:
            proc = procs.get(pid)
            first = proc is None
            try:
                if proc is None:
                    proc = procs[pid] = psutil.Process(pid)
                with proc.oneshot():
                    cpu = proc.cpu_percent(interval=None)
                    rss = int(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                procs.pop(pid, None)
                continue
            out.append((pid, None if first else float(cpu), rss))
        return out

    return sample


def uss_of(pid: int) -> int | None:
    """Unique set size of ``pid`` (what exiting it would free), falling back to RSS; None if gone.

    Reads ``/proc/PID/smaps`` (a few milliseconds): for one-off measurements, not for sampling.
    """
    try:
        proc = psutil.Process(pid)
        try:
            return int(proc.memory_full_info().uss)
        except (psutil.AccessDenied, AttributeError):
            return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (ResourceSnapshot, WorkerPlan):
    _public.__module__ = "stagepool"
