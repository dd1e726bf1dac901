"""What a batch makes of each backend answer: final pieces, retries and the hunt for a culprit.

    answer (encoded ChunkResult) --decode--> values + errors   --> Run piece (+ Fail / retry)
    LaneDied(offset k)           --> item k: crash / timeout / cancelled (or a retry); the items
                                     before and after it go out again
    LaneDied(offset -1)          --> nobody can say which item: the chunk goes out again in halves
                                     until the guilty item is alone (exact blame on any backend)
    LaneDied(reason "lost")      --> its first ``ran`` items ran, none is guilty, the answer died:
                                     they go out again, charged (or, rerun_innocent=False, each
                                     is reported lost); the rest go out again uncharged
    an argument that would not unpickle in the worker, an answer that will not decode
                                 --> the same halving, then that item's "serialization" failure
    Cancelled                    --> every item "cancelled"
"""

from __future__ import annotations

import dataclasses
import operator
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from ._backends import Cancelled, Codec, LaneDied, TaskResult
from ._chunking import ChunkSizer
from ._config import DEFAULT_RETRY_ON, Timeout, item_timeouts
from ._errors import TaskCancelled
from ._failures import (
    KILLED_BY,
    RetryOn,
    death_failure,
    lost_result_error,
    rebuild_error,
    retryable,
    unpickled_result_error,
)
from ._outcome import BatchStats, Failure, Kind
from ._pressure import MemoryWatch
from ._transport import imported_numpy
from ._worker import ChunkResult

__all__ = ["Answers", "BatchPolicy", "Fail", "Lot", "Piece", "Resend", "Run"]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPolicy:
    """The engine's settings a batch follows (per-call options are in ``BatchSpec``)."""

    retries: int = 0
    retry_on: RetryOn = DEFAULT_RETRY_ON
    backoff: float = 0.0
    max_in_flight: int = 5
    rerun_innocent: bool = True  # re-run items whose results died with their worker
    memory: MemoryWatch | None = None  # pause dispatch under memory pressure (_pressure.py)
    max_chunk: int | None = None  # max_tasks_per_worker: no chunk holds more than a worker may run


class Run(NamedTuple):
    """Consecutive results of one chunk; the offsets in ``skip`` failed (see their Fail).
    ``attempts``: how often each ran, this run included."""

    start: int
    values: list[Any]
    durations: array[float]
    pid: int
    attempts: int
    skip: frozenset[int]


class Fail(NamedTuple):
    """One item's final failure."""

    index: int  # type: ignore[assignment]  # the field hides tuple.index, on purpose
    failure: Failure


Piece = Run | Fail


class Lot(NamedTuple):
    """Consecutive items of a batch that travel together, and their history."""

    start: int  # the index of the first
    items: list[Any]
    tries: int  # 1 + the retries they have used (what ``retries`` budgets)
    runs: int  # how often they already ran (failed, or results lost with a worker)


# Below this many items a pure-Python difference is as fast as numpy's (and needs no numpy).
NUMPY_DIFF_MIN = 64


class Resend(NamedTuple):
    """Items that go out again at ``due`` (time.monotonic): innocents, halves, retries, and the
    unstarted rest of a chunk cut short by its budget (``recut``: it goes out in chunks the
    sizer sizes, see ``next_again``)."""

    due: float
    lot: Lot
    recut: bool = False


def durations_of(stamps: array[float], n: int) -> tuple[array[float], float]:
    """Per-item durations from the worker's timestamps (n + 1 of them, or start and end only)."""
    busy = stamps[-1] - stamps[0] if len(stamps) >= 2 else 0.0
    if len(stamps) == n + 1:
        np = imported_numpy()  # never imported for this: ~150 ms off the first result
        if np is None or n < NUMPY_DIFF_MIN:
            return array("d", map(operator.sub, stamps[1:], stamps[:-1])), busy
        return array("d", np.diff(np.frombuffer(stamps, dtype=np.float64)).tobytes()), busy
    return array("d", [busy / n if n else 0.0]) * n, busy


class Answers:
    """Turns one batch's answers into final pieces (``ready``) and resends (``again``)."""

    def __init__(self, codec: Codec, sizer: ChunkSizer, policy: BatchPolicy,
                 timeout: Timeout) -> None:
        self.codec, self.sizer, self.policy, self.timeout = codec, sizer, policy, timeout
        self.ready: list[Piece] = []
        self.again: deque[Resend] = deque()
        self.done = self.failed = self.chunks = self.retried = 0
        self.busy = 0.0
        # The input index of a batch position, for messages (positions differ only with cost=).
        self.label: Callable[[int], int] = _same

    def absorb(self, lot: Lot, result: TaskResult) -> None:
        self.chunks += 1
        if isinstance(result, LaneDied):
            self._death(lot, result)
        elif isinstance(result, Cancelled):
            self.cancelled(lot.start, len(lot.items), result.reason, result.cause, lot.runs)
        else:
            self._answer(lot, result)

    def _answer(self, lot: Lot, result: Any) -> None:
        start, items, tries, runs = lot
        try:
            answer: ChunkResult = self.codec.decode(result)
        except Exception as exc:  # they ran; their results will not decode: find the culprit
            if len(items) > 1:
                self._halve(lot._replace(runs=runs + 1))
            else:
                self.final(start, "serialization", unpickled_result_error(self.label(start), exc),
                           runs + 1)
            return
        durations, busy = durations_of(answer.stamps, len(answer.values))
        self.busy += busy
        self.sizer.observe(len(answer.values), busy, start)
        if len(answer.values) < len(items):  # cut short by its budget: the rest never started
            self._cut(lot, len(answer.values))
            items = items[: len(answer.values)]
        errors = answer.errors or {}
        if len(items) > 1 and any(info.kind == "unpickle" for info in errors.values()):
            self._halve(lot)  # nothing ran: which argument would not unpickle? find it
            return
        for offset, info in errors.items():
            kind, error, tb = rebuild_error(info, self.label(start + offset))
            ran = info.kind != "unpickle"
            self.failure_or_retry(Lot(start + offset, [items[offset]], tries, runs + ran), kind,
                                  error, tb, durations[offset], answer.pid)
        self.ready.append(Run(start, answer.values, durations, answer.pid, runs + 1,
                              frozenset(errors)))
        self.done += len(answer.values) - len(errors)

    def _death(self, lot: Lot, died: LaneDied) -> None:
        start, items, tries, runs = lot
        if died.reason == "lost":  # its first ``ran`` items ran (None: all), none is guilty
            ran = len(items) if died.ran is None else min(died.ran, len(items))
            if ran < len(items):  # they never started
                self.again.appendleft(Resend(0.0, Lot(start + ran, items[ran:], tries, runs)))
            if ran:
                self._innocent(Lot(start, items[:ran], tries, runs + 1), died, None)
            return
        if died.offset < 0 and len(items) > 1:
            if died.ran == 0:  # it died before any item ran: halving repeats nothing
                self._halve(lot)
            elif self._rerun(died):
                self._halve(lot._replace(runs=runs + 1))  # they may have run: count it
            else:
                self._lost(lot._replace(runs=runs + 1), died, None)
            return
        offset = max(0, died.offset)
        stage = "running" if died.offset >= 0 else "unpickling, running or pickling the data of"
        index = start + offset
        limit = item_timeouts(self.timeout, [items[offset]], index) if died.reason == "timeout" else None
        seconds = limit[0] if isinstance(limit, tuple) else float("nan")
        kind, error = death_failure(died, self.label(index), stage, seconds)
        ran = died.offset >= 0 or died.ran != 0
        self.failure_or_retry(Lot(index, [items[offset]], tries, runs + ran), kind, error,
                              died.stack or None, died.duration, died.pid)
        # The innocent: what ran before (results lost with the worker), what it ran after the
        # guilty one before our kill landed (``ran`` past it), and what had not started.
        after = min(len(items), max(offset + 1, died.ran or 0))
        if after < len(items):
            self.again.appendleft(Resend(0.0, Lot(start + after, items[after:], tries, runs)))
        if after > offset + 1:
            self._innocent(Lot(index + 1, items[offset + 1:after], tries, runs + 1), died, index)
        if offset > 0:
            self._innocent(Lot(start, items[:offset], tries, runs + 1), died, index)

    def _innocent(self, lot: Lot, died: LaneDied, guilty: int | None) -> None:
        """Items that ran (``lot.runs`` counts it) and whose results died with their worker:
        they go out again, or with ``rerun_innocent=False`` are reported lost."""
        if self._rerun(died):
            self.again.appendleft(Resend(0.0, lot))
        else:
            self._lost(lot, died, guilty)

    def _rerun(self, died: LaneDied) -> bool:
        """Whether items that ran and lost their results go out again: not after a kill of ours
        (their batch or the engine is over: re-sent, they would read "cancelled before it ran")."""
        return self.policy.rerun_innocent and died.reason not in KILLED_BY

    def _cut(self, lot: Lot, ran: int) -> None:
        """The unstarted rest of a chunk cut by its budget goes out again first, but after the
        rests of cut chunks that come before it: the items then run in input order, as they
        would have without the blind plan (a user's longest-first order is kept, and the batch
        ends on its last items, not on the first chunk's rest: 200 uneven items ended 36 ms
        apart on two workers instead of 14)."""
        self.sizer.observe_cut()
        rest = Resend(0.0, Lot(lot.start + ran, lot.items[ran:], lot.tries, lot.runs), recut=True)
        again, at = self.again, 0
        while at < len(again) and again[at].recut and again[at].lot.start < rest.lot.start:
            at += 1
        again.insert(at, rest)

    def next_again(self, room: int) -> Lot | None:
        """The lot of the first resend, or None if it does not fit in ``room`` (items the
        batch may still have in workers). A cut chunk's rest goes in pieces of ``rest_size``
        (from what is left of every cut chunk: the shares shrink towards the end as usual)."""
        due, lot, recut = self.again[0]
        if recut:
            left = sum(len(resend.lot.items) for resend in self.again if resend.recut)
            size = min(self.sizer.rest_size(left), len(lot.items), room)
            if 0 < size < len(lot.items):
                self.again[0] = Resend(due, lot._replace(start=lot.start + size,
                                                         items=lot.items[size:]), recut)
                return lot._replace(items=lot.items[:size])
        if room < len(lot.items):
            return None
        self.again.popleft()
        return lot

    def _lost(self, lot: Lot, died: LaneDied, guilty: int | None) -> None:
        """``rerun_innocent=False``: items that ran, whose results died with their worker, are
        reported instead of run again (for stages that must not run twice); after a kill of ours
        they are "cancelled", naming its cause."""
        how = (f"died on item {self.label(guilty)}" if guilty is not None else
               died.detail if died.reason == "lost" else "died on an item of their chunk")
        kind: Kind = "cancelled" if died.reason in KILLED_BY else "crash"
        for i in range(lot.start, lot.start + len(lot.items)):
            self.final(i, kind, lost_result_error(died, self.label(i), how), lot.runs,
                       pid=died.pid)

    def _halve(self, lot: Lot) -> None:
        start, items, tries, runs = lot
        mid = len(items) // 2
        self.again.appendleft(Resend(0.0, Lot(start + mid, items[mid:], tries, runs)))
        self.again.appendleft(Resend(0.0, Lot(start, items[:mid], tries, runs)))

    def failure_or_retry(self, one: Lot, kind: Kind, error: Exception, tb: str | None,
                         duration: float, pid: int | None) -> None:
        """One item's failure: final, or (``retry_on`` and budget allowing) run again."""
        policy = self.policy
        if one.tries <= policy.retries and retryable(policy.retry_on, kind, error):
            self.retried += 1
            delay = policy.backoff * 2 ** (one.tries - 1)
            self.again.append(Resend(time.monotonic() + delay, one._replace(tries=one.tries + 1)))
            return
        self.final(one.start, kind, error, one.runs, tb, duration, pid)

    def stats(self, items: int, wall: float, workers: int, *, pauses: int = 0,
              paused_time: float = 0.0) -> BatchStats:
        """The batch's statistics, from what its answers said (and the memory gate's pauses)."""
        chunks = self.chunks
        return BatchStats(items=items, wall_time=wall, busy_time=self.busy, workers=workers,
                          chunks=chunks, chunk_size=items / chunks if chunks else 0.0,
                          retries=self.retried, pauses=pauses, paused_time=paused_time)

    def cancelled(self, start: int, n: int, reason: object, cause: BaseException | None,
                  runs: int) -> None:
        """Items ``start`` to ``start + n - 1`` never ran: each is "cancelled", saying why."""
        for i in range(start, start + n):
            error = TaskCancelled(f"item {self.label(i)} was cancelled before it ran: {reason}")
            error.__cause__ = cause  # the backend's own failure, or the engine's closing
            self.final(i, "cancelled", error, runs)

    def final(self, index: int, kind: Kind, error: Exception, attempts: int,
              tb: str | None = None, duration: float = 0.0, pid: int | None = None) -> None:
        """The item's final failure; ``attempts``: how often it ran (0: never)."""
        self.ready.append(Fail(index, Failure(kind, error, tb, duration, pid, attempts)))
        self.failed += 1
        self.done += 1


def _same(index: int) -> int:
    return index
