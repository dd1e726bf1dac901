"""When a running chunk's items must be stopped: per-item deadlines from the shared record.

Pure functions of a task and a slot's state (no processes), so the pool thread can ask "when
must I look again?" and "has this worker's item expired?" without a clock read per item.

Two ways to know when an item started. Items worth a clock read (``Task.per_item_clock``) have
the worker write each item's start time: the deadline is exact (``deadline_of``). Tiny items
(under ~10 us) do not: two clock reads and a store cost as much as a trivial item, and a numeric
``timeout=`` made such a batch 31-57% slower. For them the pool thread samples the item offset
the worker writes anyway (``sampled_deadline``): an offset seen unchanged for the item's whole
limit means that item overran it. It is stopped between its limit and its limit plus
max(limit / ``SAMPLES``, ``MIN_SAMPLE_INTERVAL``) (never early), with the same exact blame.
``Limits`` applies them to the serving lanes (reading the record, and RSS under a memory cap):
it decides which worker must be killed and why; the crew (``_crew``) kills it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

from ..._config import is_uniform
from ..._resources import rss_of
from ..._worker import (
    OFFSET_ENCODING,
    OFFSET_FREEING,
    PHASE_ENCODE,
    PHASE_IDLE,
    PHASE_INIT,
    PHASE_RUN,
)
from .._protocol import DeathReason, Task
from ._lanes import Lane
from ._record import SharedRecord, SlotState

__all__ = ["MAX_WAIT", "POLL_INTERVAL", "SAMPLES", "Limits", "Seen", "deadline_of",
           "sampled_deadline", "wait_seconds"]

# How often the pool thread looks at the record while some running item has a timeout it cannot
# compute a deadline for yet (the worker has not started the chunk), and at RSS under a memory cap.
POLL_INTERVAL = 0.05
# The longest the pool thread sleeps in one wait: the OS poll() takes at most 2**31 - 1 ms, and a
# month-long timeout must not overflow it (it then simply wakes up once an hour).
MAX_WAIT = 3600.0
# Samples of a tiny-item chunk's offset per item limit: the precision of its timeout (10%), at
# the price of a pool-thread turn every limit / SAMPLES while such a chunk runs.
SAMPLES = 10
# ...but no more often than this: a 5 ms limit on tiny items does not need 2,000 turns a second.
MIN_SAMPLE_INTERVAL = 0.002

# Per task: the smallest timeout from each offset on, or the one number of a uniform timeout.
_suffix_minima: dict[int, list[float] | float] = {}


def _suffixes(timeouts: tuple[float, ...]) -> list[float] | float:
    if is_uniform(timeouts) or (timeouts and timeouts.count(timeouts[0]) == len(timeouts)):
        return timeouts[0]  # timeout=N (or a callable's equal limits): no list needed
    suffix = [float("inf")] * (len(timeouts) + 1)
    for i in range(len(timeouts) - 1, -1, -1):
        suffix[i] = min(timeouts[i], suffix[i + 1])
    return suffix


def _later_min(task: Task, offset: int) -> float:
    """The smallest timeout among the items after ``offset`` (inf if none), cached per task."""
    suffix = _suffix_minima.get(task.id)
    if suffix is None:
        if len(_suffix_minima) > 1024:
            _suffix_minima.clear()
        suffix = _suffix_minima[task.id] = _suffixes(task.timeouts or ())
    if not isinstance(suffix, list):
        return suffix if offset + 1 < task.n_items else float("inf")
    return suffix[min(offset + 1, len(suffix) - 1)]


def deadline_of(task: Task, state: SlotState, now: float) -> float | None:
    """When the worker running ``task`` must have finished its current item (None: never)."""
    timeouts = task.timeouts
    if timeouts is None:
        return None
    if not _started(task, state):
        # Not started yet: look again soon. Offset -1 in the run phase is the moment before
        # the first item, when the slot's start time is still a past item's (0.0 when fresh).
        return _look_again(task, now, state)
    # The item running now, or a later item that starts after this moment: whichever could
    # expire first. (Without the second term a short timeout behind a long one is missed.)
    return min(state.start + timeouts[state.offset], now + _later_min(task, state.offset))


def _started(task: Task, state: SlotState) -> bool:
    """Whether ``state`` shows the worker on one of ``task``'s items. An offset past the chunk's
    end is a slot read while its worker moved on from a longer chunk (``SharedRecord.state``
    reads the chunk first, the worker writes it after the offset: should the order not hold)."""
    return state.chunk == task.id and state.phase == PHASE_RUN and \
        0 <= state.offset < task.n_items


def _look_again(task: Task, now: float, state: SlotState) -> float:
    """When to look again at a chunk not started yet: within one sample interval of its
    shortest limit (at most ``POLL_INTERVAL``), so an item that starts meanwhile is seen before
    it can overrun its limit by more than that and finish unnoticed. A worker past a chunk's
    items (a ``__reduce__`` or finalizer that hangs) may hold it up for that limit at most:
    pickling its answer (killed, the chunk is halved to find the guilty item), or letting go
    of the chunk it answered before (killed with no item to blame)."""
    shortest = _later_min(task, -1)
    wake = now + min(POLL_INTERVAL, max(shortest / SAMPLES, MIN_SAMPLE_INTERVAL))
    return min(wake, state.start + shortest) if _past_items(task, state) else wake


def _past_items(task: Task, state: SlotState) -> bool:
    """Whether the slot shows its worker past the items: encoding ``task``'s answer, or still
    letting go of the chunk it answered before ``task`` (``state.start``: since when)."""
    if state.offset == OFFSET_ENCODING:
        return state.phase == PHASE_ENCODE and state.chunk == task.id
    return state.offset == OFFSET_FREEING and state.phase == PHASE_IDLE and state.chunk != task.id


class Seen(NamedTuple):
    """Where the pool thread last saw a tiny-item chunk's worker, and since when."""

    chunk: int
    offset: int
    since: float  # time.monotonic


def sampled_deadline(task: Task, state: SlotState, now: float,
                     seen: Seen | None) -> tuple[float | None, Seen | None]:
    """``deadline_of`` for a chunk of tiny items (no per-item start times): the deadline, and
    what to remember for the next look. An item whose offset was first seen at ``since`` started
    before then, so ``since + limit`` is never early; looking again every limit / ``SAMPLES``
    bounds how late it can be."""
    timeouts = task.timeouts
    if timeouts is None:
        return None, None
    if not _started(task, state):
        return _look_again(task, now, state), None  # not started yet: look again soon
    if seen is None or seen.chunk != task.id or seen.offset != state.offset:
        seen = Seen(task.id, state.offset, now)
    limit = float(timeouts[state.offset])
    shortest = min(limit, _later_min(task, state.offset))
    return min(seen.since + limit, now + max(shortest / SAMPLES, MIN_SAMPLE_INTERVAL)), seen


def wait_seconds(wake: float | None, now: float) -> float | None:
    """How long the pool thread may sleep until ``wake`` (None: until something happens)."""
    if wake is None or wake == float("inf"):
        return None
    return min(MAX_WAIT, max(0.0, wake - now))


class Limits:
    """The time and memory limits of the workers sharing ``record``: when the pool thread must
    wake up to check them, and which workers broke them."""

    def __init__(self, record: SharedRecord, init_timeout: float | None,
                 max_rss: int | None) -> None:
        self._record, self._init_timeout, self._max_rss = record, init_timeout, max_rss
        self._seen: dict[int, Seen] = {}  # by slot: tiny-item chunks' offsets (sampled_deadline)

    def next_wake(self, lanes: list[Lane], leaving: Iterable[float]) -> float | None:
        """The next moment a limit may be broken (None: none can be), ``leaving`` included:
        the moments the leaving workers must be killed."""
        now = time.monotonic()
        wakes = [d for lane in lanes
                 for d in (self._deadline(lane, now)[0], self._init_deadline(lane)) if d is not None]
        if self._max_rss is not None and any(lane.tasks for lane in lanes):
            wakes.append(now + POLL_INTERVAL)
        wakes.extend(leaving)
        return min(wakes, default=None)

    def broken(self, lanes: list[Lane]) -> list[tuple[Lane, DeathReason, int]]:
        """The workers to kill: each with why, and the offset of the item to blame (-1: none)."""
        now = time.monotonic()
        verdicts: list[tuple[Lane, DeathReason, int]] = []
        for lane in lanes:
            deadline, offset = self._deadline(lane, now)
            init_deadline = self._init_deadline(lane)
            if init_deadline is not None and now >= init_deadline:
                verdicts.append((lane, "init_timeout", -1))  # every task fails, naming it
            elif deadline is not None and now >= deadline and lane.tasks:
                # The offset the deadline was read with: read again, it may name the next item,
                # which the worker started just after the one that overran ended.
                verdicts.append((lane, "timeout", offset))
            elif self._max_rss is not None and lane.tasks and lane.kill_reason is None:
                running = self._running_item(lane)
                if running >= 0 and (rss_of(lane.pid) or 0) > 2 * self._max_rss:
                    verdicts.append((lane, "memory", running))  # one item far past the cap
        return verdicts

    def _init_deadline(self, lane: Lane) -> float | None:
        """When a worker still in its initializer must be stopped (None: it is past it, or no
        limit). A worker that has not reached its initializer yet writes nothing the pool thread
        would wake for: look again in POLL_INTERVAL until it has."""
        if self._init_timeout is None or lane.kill_reason is not None or lane.answered:
            return None
        state = self._record.state(lane.slot)
        if state.phase == PHASE_INIT:
            return state.start + self._init_timeout
        if self._record.pid(lane.slot) != lane.pid:  # not started yet
            return time.monotonic() + POLL_INTERVAL
        return None

    def _deadline(self, lane: Lane, now: float) -> tuple[float | None, int]:
        """When the item running on ``lane`` must end (None: never), and its offset in the
        chunk: both from one read of the slot."""
        if not lane.tasks or lane.kill_reason is not None or lane.tasks[0].timeouts is None:
            return None, -1
        task, state = lane.tasks[0], self._record.state(lane.slot)
        if task.per_item_clock:
            return deadline_of(task, state, now), state.offset
        deadline, seen = sampled_deadline(task, state, now, self._seen.get(lane.slot))
        if seen is None:
            self._seen.pop(lane.slot, None)
        else:
            self._seen[lane.slot] = seen
        return deadline, state.offset

    def _running_item(self, lane: Lane) -> int:
        """The offset of the item of its chunk the worker is inside, else -1. Only then is its
        memory an item's fault: a worker killed while starting (a cap below a fresh worker's
        size) would blame no item, and its chunk would be requeued onto the next worker, killed
        alike, forever. (The offset of this read is the one to blame: read again, it may be
        the next item's.)"""
        state = self._record.state(lane.slot)
        running = state.chunk == lane.tasks[0].id and state.phase == PHASE_RUN
        return state.offset if running else -1
