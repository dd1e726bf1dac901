"""Memory-pressure backpressure: a batch stops dispatching while the memory it may use is
nearly full, and starts again once it has drained, before the OOM killer picks a victim.

    MemoryReader (_resources: cgroup files if there is a cgroup limit, and psutil; at most
                  every READ_EVERY s, from the batch's dispatch path)
      -> memory_use(): the fuller of the cgroup level with the least headroom (its page cache
                       not counted: the kernel reclaims it first) and the machine
      -> next_paused(): hysteresis between two marks (pure)
            running   --fraction >= high-->  paused     (running items finish; nothing new starts)
            paused    --fraction <  low --->  running
            paused for LOG_AFTER, nothing of the batch in flight: one chunk at a time (logged)
      -> PressureGate.allows(): asked by the batch before each chunk it would send

Like dask's worker thresholds (target 60%, spill 70%, pause 80%, terminate 95%), the defaults
pause at 80% and resume at 70%. A pause that lasts is logged (once per batch) with the reading,
so a machine full of someone else's memory does not look like a hang.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from ._cgroups import CgroupLimits
from ._resources import read_machine_memory, read_memory

__all__ = ["MemoryReader", "MemoryUse", "MemoryWatch", "PressureGate", "Watermarks",
           "check_watermarks", "memory_use", "next_paused"]

_log = logging.getLogger("stagepool")

# Trade-off: a fresher reading reacts sooner to a fast allocation, but costs 50 us - 3 ms
# (MemoryReader); every 100 ms bounds that to at most ~3% of the batch thread on a loaded host
# with a cgroup limit (~0.1% without one), and a worker can allocate only so much in 100 ms.
READ_EVERY = 0.1
# A pause this long is logged once, with the reading: the memory may be someone else's.
LOG_AFTER = 10.0
DEFAULT_HIGH = 0.8
DEFAULT_GAP = 0.1  # low = high - gap when only high is given (see _default_low)


class Watermarks(NamedTuple):
    high: float  # pause at or above this fraction of the limit
    low: float  # resume below this one


class MemoryUse(NamedTuple):
    used: int
    limit: int
    where: str  # "cgroup" or "machine": whose limit is nearest

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else 0.0


def check_watermarks(high: object, low: object) -> Watermarks | None:
    """Validate ``memory_high`` / ``memory_low`` (fractions of the memory limit); None disables.

    Raises ``TypeError`` / ``ValueError`` naming the argument."""
    if high is None:
        if low is not None:
            raise ValueError("memory_low needs memory_high (memory_high=None disables the "
                             "memory backpressure)")
        return None
    h = _fraction(high, "memory_high")
    lo = _default_low(h) if low is None else _fraction(low, "memory_low")
    if not lo < h:
        raise ValueError(f"memory_low ({lo:g}) must be below memory_high ({h:g}): dispatch "
                         "resumes below memory_low after pausing at memory_high")
    return Watermarks(h, lo)


def _default_low(high: float) -> float:
    """``high - 0.1``; half of ``high`` when that is 0 or less, since memory is never below 0 %
    and a batch paused there would never resume."""
    return round(high - DEFAULT_GAP if high > DEFAULT_GAP else high / 2, 9)


def _fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats too
        raise TypeError(f"{name} must be a fraction of the memory limit (e.g. 0.8) or None, "
                        f"not {value!r}")
    fraction = float(value)
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1] (a fraction of the memory limit), "
                         f"got {value!r}")
    return fraction


def memory_use(cgroup: CgroupLimits, total: int, available: int) -> MemoryUse:
    """The fuller of the cgroup (usage minus reclaimable cache, over its limit) and the machine
    (total minus available, over total). Pure."""
    machine = MemoryUse(max(0, total - available), total, "machine")
    if cgroup.mem_limit is None or cgroup.mem_usage is None:
        return machine
    used = max(0, cgroup.mem_usage - (cgroup.mem_reclaimable or 0))
    group = MemoryUse(used, cgroup.mem_limit, "cgroup")
    return group if group.fraction >= machine.fraction else machine


def next_paused(paused: bool, fraction: float, marks: Watermarks) -> bool:
    """Hysteresis: pause at ``high``, resume below ``low``. Pure."""
    return fraction >= marks.low if paused else fraction >= marks.high


class MemoryReader:
    """The real reading. The cgroup files are read again only if the first reading found a
    cgroup memory limit; otherwise only the machine's memory (cheap) is read each time."""

    def __init__(self) -> None:
        self._cgroup: bool | None = None  # None: not known yet

    def __call__(self) -> MemoryUse:
        if self._cgroup is False:
            return memory_use(_NO_LIMIT, *read_machine_memory())
        cgroup, total, available = read_memory()
        self._cgroup = cgroup.mem_limit is not None
        return memory_use(cgroup, total, available)


_NO_LIMIT = CgroupLimits()


class MemoryWatch:
    """An engine's memory readings, shared by all its batches: at most one reading every
    ``every`` seconds however many batches run (a batch of tiny items usually pays nothing).

    ``read`` and ``clock`` are injectable (tests drive them with fake readings and a fake
    clock). Thread-safe."""

    def __init__(self, marks: Watermarks, read: Callable[[], MemoryUse] | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = READ_EVERY) -> None:
        self.marks, self.clock, self.every = marks, clock, every
        self._read = MemoryReader() if read is None else read
        self._lock = threading.Lock()
        self._use: MemoryUse | None = None
        self._at = -math.inf

    def reading(self) -> tuple[MemoryUse, float]:
        """The latest reading (fresh if the last one is ``every`` old) and the time now."""
        now = self.clock()
        with self._lock:
            if self._use is None or now - self._at >= self.every:
                self._use, self._at = self._read(), now
            return self._use, now


class PressureGate:
    """One batch's view of memory pressure: counts its pauses and the time spent paused.
    Not thread-safe: the batch's own thread asks it."""

    def __init__(self, watch: MemoryWatch) -> None:
        self.watch, self.marks, self.clock = watch, watch.marks, watch.clock
        self.paused = False
        self.pauses = 0
        self._paused_time = 0.0
        self._since = 0.0  # when the current pause began
        self._logged = False
        self.last: MemoryUse | None = None

    def allows(self, idle: bool = False) -> bool:
        """Whether the batch may send another chunk now. ``idle``: none of the batch's chunks
        is in flight. A batch paused for LOG_AFTER with none of its own work running waits on
        memory it cannot free (another program's, or a mark below what the machine already
        uses): it then sends one chunk at a time, so it moves on slowly instead of forever
        never."""
        use, now = self.watch.reading()
        if use is not self.last:
            self._update(use, now)
        return not self.paused or (idle and now - self._since >= LOG_AFTER)

    def _update(self, use: MemoryUse, now: float) -> None:
        self.last = use
        paused = next_paused(self.paused, use.fraction, self.marks)
        if paused and not self.paused:
            self.pauses += 1
            self._since = now
        elif self.paused and not paused:
            self._paused_time += now - self._since
        self.paused = paused
        if paused and not self._logged and now - self._since >= LOG_AFTER:
            self._logged = True
            _log.warning("stagepool: dispatch paused for %.0f s: %s memory %.0f%% full (%d of %d "
                         "bytes; resumes below %.3g%%); meanwhile the batch sends one chunk at a "
                         "time whenever none of it runs. memory_high=None disables this",
                         now - self._since, use.where, 100 * use.fraction, use.used, use.limit,
                         100 * self.marks.low)

    def paused_time(self) -> float:
        """Seconds spent paused so far (the current pause included)."""
        ongoing = self.clock() - self._since if self.paused else 0.0
        return self._paused_time + ongoing
