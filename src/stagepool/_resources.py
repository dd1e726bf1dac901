"""What the machine offers, read once (how many workers that buys is decided in ``_planning``).

This is the only module of the package that imports psutil; it, ``_cgroups`` and ``_meminfo`` are
the only ones that read ``/proc`` and ``/sys/fs/cgroup``. Everything else gets plain data:

```
/proc/self/cgroup ----\
/sys/fs/cgroup/...  ---+--> ResourceSnapshot.read() --> ResourceSnapshot (frozen, plain data)
psutil, os, environ --/                                        |
                                                               v
             mem_per_task, reserve_cores, max_workers --> _planning.plan_from_snapshot()
                                                          --> WorkerPlan (pure: workers,
                                                              limited_by, reason)
```

Reading never raises because of a missing or odd cgroup: an absent or unreadable file means "no
limit". The one thing that does raise is a malformed ``STAGEPOOL_MAX_WORKERS``, because a typo in
an operator's ceiling should not be silently ignored. That variable is a maximum: it lowers a
worker count, never raises one.

The small process helpers at the end (``process_tree_pids``, ``rss_of``, ``kill_tree``,
``kill_group``, and the profiler's ``cpu_rss_sampler`` and ``uss_of``) live here so that psutil
stays in one module. (What the profiler reads inside a worker, without psutil, is in ``_probe``.)
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._cgroups import CgroupLimits, read_cgroup
from ._lazy import LazyModule
from ._meminfo import read_meminfo

if TYPE_CHECKING:
    import psutil

__all__ = [
    "ENV_MAX_WORKERS",
    "FDS_PER_WORKER",
    "FDS_RESERVED",
    "THREAD_ENV_VARS",
    "ProcessSample",
    "ResourceSnapshot",
    "check_field",
    "cpu_rss_sampler",
    "kill_group",
    "kill_tree",
    "process_tree_pids",
    "read_machine_memory",
    "read_memory",
    "rss_of",
    "uss_of",
]

ENV_MAX_WORKERS = "STAGEPOOL_MAX_WORKERS"


if not TYPE_CHECKING:  # imported when an Engine is built, not by ``import stagepool``
    psutil = LazyModule("psutil", globals())

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

# A worker costs the parent 3 descriptors for as long as it lives (its pipe, its stderr pipe, its
# process sentinel) and one more while it is being spawned; the reserve is for the process's own
# files, the pool thread's wake-up pipe and shared memory segments being opened.
FDS_PER_WORKER = 4
FDS_RESERVED = 64



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
        check_field("logical_cpus", self.logical_cpus, minimum=1)
        check_field("affinity_cpus", self.affinity_cpus, minimum=1, optional=True)
        check_field("env_max_workers", self.env_max_workers, minimum=1, optional=True)
        check_field("open_files_limit", self.open_files_limit, minimum=0, optional=True)
        check_field("mem_total", self.mem_total, minimum=0)
        check_field("mem_available", self.mem_available, minimum=0)
        check_field("cgroup_mem_limit", self.cgroup_mem_limit, minimum=0, optional=True)
        check_field("cgroup_mem_usage", self.cgroup_mem_usage, minimum=0, optional=True)
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
        cgroup = read_cgroup(Path(proc_root), Path(cgroup_root))
        if mem_total is None or mem_available is None:
            total, available = read_machine_memory(proc_root=proc_root)
            mem_total = total if mem_total is None else mem_total
            mem_available = available if mem_available is None else mem_available
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


def check_field(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
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
# Process helpers (psutil stays in this module)
# --------------------------------------------------------------------------------------------------


def process_tree_pids(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (not ``pid`` itself); empty if it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def rss_of(pid: int) -> int | None:
    """The private resident memory of ``pid`` in bytes (resident minus resident shared pages:
    what the process costs on its own); None if the process is gone (or not ours to read).

    Shared pages are not its own: the engine's ``shared=`` arrays and shared-memory inputs it
    touched, and the libraries' code. Counted, they made ``max_rss_per_worker`` blame an item
    for reading 1 GB of the pool's shared data (a breaker's finding)."""
    try:
        info = psutil.Process(pid).memory_info()
        return int(info.rss - getattr(info, "shared", 0))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_tree(pid: int, *, grace: float = 0.5) -> None:
    """SIGTERM ``pid`` and all its descendants, wait up to ``grace`` s, then SIGKILL survivors.

    Descendants are listed before anything is signalled: once the parent dies they are reparented
    and can no longer be found. When ``pid`` leads a process group (a worker does), the whole
    group is signalled too: it also holds what an item started through a process that has already
    exited (``sh -c "cmd &"``), which no longer descends from ``pid``. Processes that are already
    gone are ignored. After the SIGKILL it waits up to ``grace`` again for them to exit, so the
    call returns within about ``2 * grace``.
    """
    if grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
    if pid == os.getpid():
        raise ValueError("kill_tree() refuses to kill the calling process")
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
        group = pid if os.getpgid(pid) == pid else None
    except (psutil.NoSuchProcess, ProcessLookupError):
        return
    _signal_all(procs, kill=False)
    if group is not None:
        _signal_group(group, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    if group is not None:  # members that psutil could not see get no second chance either
        _signal_group(group, signal.SIGKILL)
    if alive:
        _signal_all(alive, kill=True)
        psutil.wait_procs(alive, timeout=grace)


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid``: what a dead worker's items left running (see
    ``_worker_guards.lead_own_group``). Call it before the worker is reaped: its zombie keeps the
    group id from being reused. Does nothing if the group is gone or is not ours to signal."""
    if pgid > 0 and pgid != os.getpgrp():  # never the caller's own group
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
for _public in (ResourceSnapshot,):
    _public.__module__ = "stagepool"


def read_memory(*, proc_root: str | os.PathLike[str] = "/proc",
                cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
                ) -> tuple[CgroupLimits, int, int]:
    """The memory readings backpressure needs (``_pressure.memory_use`` decides): the cgroup's
    limit, usage and reclaimable cache, and the machine's total and available bytes. The
    cgroup walk costs about 0.3-3 ms (more on a loaded host; ``memory.stat`` is generated by
    the kernel on each read), ``psutil.virtual_memory()`` about 50-400 us."""
    return read_cgroup(Path(proc_root), Path(cgroup_root)), *read_machine_memory(proc_root=proc_root)


def read_machine_memory(*, proc_root: str | os.PathLike[str] = "/proc") -> tuple[int, int]:
    """The machine's total and available bytes: ``MemTotal`` and ``MemAvailable`` of
    ``/proc/meminfo`` (what ``psutil.virtual_memory()`` reports on Linux), else psutil's."""
    read = read_meminfo(Path(proc_root))
    if read is not None:
        return read
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)
