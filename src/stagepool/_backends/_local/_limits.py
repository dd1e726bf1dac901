"""When a running chunk's items must be stopped: per-item deadlines from the shared record.

Pure functions of a task and a slot's state (no processes), so the pool thread can ask "when
must I look again?" and "has this worker's item expired?" without a clock read per item.
"""

from __future__ import annotations

from ..._worker import PHASE_RUN
from .._protocol import Task
from ._record import SlotState

__all__ = ["MAX_WAIT", "POLL_INTERVAL", "deadline_of", "wait_seconds"]

# How often the pool thread looks at the record while some running item has a timeout it cannot
# compute a deadline for yet (the worker has not started the chunk), and at RSS under a memory cap.
POLL_INTERVAL = 0.05
# The longest the pool thread sleeps in one wait: the OS poll() takes at most 2**31 - 1 ms, and a
# month-long timeout must not overflow it (it then simply wakes up once an hour).
MAX_WAIT = 3600.0

_suffix_minima: dict[int, list[float]] = {}


def _later_min(task: Task, offset: int) -> float:
    """The smallest timeout among the items after ``offset`` (inf if none), cached per task."""
    suffix = _suffix_minima.get(task.id)
    if suffix is None:
        timeouts = task.timeouts or ()
        suffix = [float("inf")] * (len(timeouts) + 1)
        for i in range(len(timeouts) - 1, -1, -1):
            suffix[i] = min(timeouts[i], suffix[i + 1])
        if len(_suffix_minima) > 1024:
            _suffix_minima.clear()
        _suffix_minima[task.id] = suffix
    return suffix[min(offset + 1, len(suffix) - 1)]


def deadline_of(task: Task, state: SlotState, now: float) -> float | None:
    """When the worker running ``task`` must have finished its current item (None: never)."""
    timeouts = task.timeouts
    if timeouts is None:
        return None
    if state.chunk != task.id or state.phase != PHASE_RUN:
        return now + POLL_INTERVAL  # not started yet: look again soon
    # The item running now, or a later item that starts after this moment: whichever could
    # expire first. (Without the second term a short timeout behind a long one is missed.)
    return min(state.start + timeouts[state.offset], now + _later_min(task, state.offset))


def wait_seconds(wake: float | None, now: float) -> float | None:
    """How long the pool thread may sleep until ``wake`` (None: until something happens)."""
    if wake is None or wake == float("inf"):
        return None
    return min(MAX_WAIT, max(0.0, wake - now))
