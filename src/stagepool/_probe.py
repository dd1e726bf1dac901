"""The profiler's probe: what runs inside a worker while ``profile_stage`` measures a stage.

The parent sends these functions with ``Engine.submit``, and they travel by reference: a worker
that unpickles ``stagepool._probe.measure_item`` imports this module and everything it imports
(for a module inside a package, the package's ``__init__`` too). So the probe sits outside the
profiler (``_profiling``, which imports the engine, numpy and psutil) and imports only the
standard library and the light ``_worker``. Otherwise the profiled worker would carry the
profiler's imports, and its "fresh worker" memory baseline with them.

What needs psutil (a worker's USS) is read from the parent, by pid, after the probe answered.
"""

from __future__ import annotations

import importlib
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._worker import dumps

__all__ = [
    "KEEP_MALLOC_BYTES",
    "Measured",
    "blas_threads",
    "clock_cost",
    "keep_malloc_memory",
    "measure_item",
    "minor_faults",
    "peak_rss",
    "pin_threads",
    "reset_peak_rss",
    "run_queue_wait",
    "worker_facts",
]

# glibc mallopt parameters, and the threshold tried when items page-fault a lot: blocks under
# KEEP_MALLOC_BYTES stay in the heap once freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_MALLOC_BYTES = 32 * 2**20

# (wall, cpu, rss before, peak rss or None, pickled result size, "Type: message" or None, faults,
#  seconds the worker's thread waited for a CPU)
Measured = tuple[float, float, int | None, int | None, int, str | None, int, float]


def measure_item(fn: Callable[[Any], Any], item: Any) -> Measured:
    """In the worker: run ``fn(item)`` once; wall, CPU, RSS before and peak, pickled result size.

    The cost of the clock reads themselves (a microsecond for the CPU clock, a syscall) is
    measured around an empty call and subtracted, so sub-microsecond items read right. Never
    raises for the item: its exception (``SystemExit`` too) or an unpicklable result comes back
    as the error text.
    """
    peak_ok = reset_peak_rss()
    before = _rss() or None  # 0: /proc/self/statm unreadable
    error: str | None = None
    value: Any = None
    faults0, waited0 = minor_faults(), run_queue_wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        value = fn(item)
    except BaseException as exc:  # the item's failure (SystemExit too), not the worker's
        error = f"{type(exc).__name__}: {exc}"
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    faults, waited = minor_faults() - faults0, run_queue_wait() - waited0
    idle_wall, idle_cpu = clock_cost()
    peak = peak_rss() if peak_ok else None
    size = 0
    if error is None:
        try:
            size = len(dumps(value))
        except BaseException as exc:
            error = f"the result cannot be pickled: {type(exc).__name__}: {exc}"
    return (max(0.0, wall - idle_wall), max(0.0, cpu - idle_cpu), before, peak, size, error,
            faults, max(0.0, waited))


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat; 0.0
    where unreadable): on a busy machine a CPU-bound item's wall time is its CPU time plus
    this, not time spent waiting for I/O."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0


def keep_malloc_memory() -> bool:
    """In the worker: make glibc's malloc keep big blocks instead of returning them to the system
    after each item (what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do at start-up). Only
    ever called in the serial pass's own worker, which is discarded afterwards. False where the
    C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_MALLOC_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 * KEEP_MALLOC_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def _noop(item: Any) -> None:
    return None


def clock_cost(repeat: int = 5) -> tuple[float, float]:
    """Wall and CPU time that the measurement in ``measure_item`` reads around a no-op call."""
    walls, cpus = [], []
    for _ in range(repeat):
        cpu0, t0 = time.process_time(), time.perf_counter()
        _noop(None)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - cpu0)
    return min(walls), min(cpus)


def worker_facts(thread_env_vars: Iterable[str]) -> dict[str, Any]:
    """In the worker: its pid, RSS, peak RSS and BLAS thread pools (``thread_env_vars``: the
    variables that size them, for when threadpoolctl is missing). 0 for what cannot be read."""
    return {"pid": os.getpid(), "rss": _rss(), "peak": peak_rss() or 0,
            "blas": blas_threads(thread_env_vars)}


def blas_threads(thread_env_vars: Iterable[str]) -> dict[str, Any]:
    """Native thread pools: threadpoolctl's view when it is installed, else the env variables."""
    try:
        threadpoolctl: Any = importlib.import_module("threadpoolctl")
    except ImportError:
        env = {name: os.environ[name] for name in thread_env_vars if os.environ.get(name)}
        counts = [int(v) for v in env.values() if v.strip().isdigit()]
        return {"source": "env", "threads": min(counts) if counts else None, "detail": env}
    pools = [{"api": p.get("internal_api"), "library": p.get("prefix"),
              "threads": p.get("num_threads")} for p in threadpoolctl.threadpool_info()]
    counts = [p["threads"] for p in pools if isinstance(p["threads"], int)]
    return {"source": "threadpoolctl", "threads": max(counts) if counts else None, "detail": pools}


def _rss() -> int:
    """This process's resident set size in bytes (0 where ``/proc/self/statm`` is unreadable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where unsupported.

    Linux >= 4.0 resets the high-water mark when "5" is written to ``/proc/self/clear_refs``.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak RSS in bytes since start or the last :func:`reset_peak_rss`.

    ``VmHWM`` from ``/proc/self/status`` on Linux; elsewhere ``ru_maxrss`` (never reset), or None.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        text = ""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            fields = line.split()
            try:
                return int(fields[1]) * 1024  # always reported in kB
            except (IndexError, ValueError):
                break
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def pin_threads(threads: int, thread_env_vars: Iterable[str]) -> None:
    """Initializer of every engine the profiler starts: the same native thread budget in each
    worker, whatever the worker count (the engine's default, CPUs // workers, would give the
    serial pass more BLAS threads than the sweep's widest run and skew every comparison). Runs
    before the stage is unpickled, so before numpy reads the variables."""
    for name in (*thread_env_vars, "STAGEPOOL_WORKER_THREADS"):
        os.environ[name] = str(threads)
