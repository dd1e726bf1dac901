"""What a batch makes of each backend answer: final pieces, retries and the hunt for a culprit.

    answer (encoded ChunkResult) --decode--> values + errors   --> Run piece (+ Fail / retry)
    LaneDied(offset k)           --> item k: crash / timeout / cancelled (or a retry); the items
                                     before and after it go out again
    LaneDied(offset -1)          --> nobody can say which item: the chunk goes out again in halves
                                     until the guilty item is alone (exact blame on any backend)
    an argument that would not unpickle in the worker, an answer that will not decode
                                 --> the same halving, then that item's "serialization" failure
    Cancelled                    --> every item "cancelled"
"""

from __future__ import annotations

import dataclasses
import time
from array import array
from collections import deque
from typing import Any, NamedTuple

from ._backends import Cancelled, Codec, LaneDied, TaskResult
from ._chunking import ChunkSizer
from ._config import Timeout, item_timeouts
from ._errors import TaskCancelled
from ._failures import RetryOn, death_failure, rebuild_error, retryable, unpickled_result_error
from ._outcome import Failure, Kind
from ._worker import ChunkResult

__all__ = ["Answers", "BatchPolicy", "Fail", "Piece", "Resend", "Run"]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPolicy:
    """The engine's settings a batch follows (per-call options are in ``BatchSpec``)."""

    retries: int = 0
    retry_on: RetryOn = ("error", "crash", "timeout")
    backoff: float = 0.0
    max_in_flight: int = 5


class Run(NamedTuple):
    """Consecutive results of one chunk; the offsets in ``skip`` failed (see their Fail)."""

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


class Resend(NamedTuple):
    """Items that go out again at ``due`` (time.monotonic): innocents, halves, retries."""

    due: float
    start: int
    items: list[Any]
    tries: int


def durations_of(stamps: array[float], n: int) -> tuple[array[float], float]:
    """Per-item durations from the worker's timestamps (n + 1 of them, or start and end only)."""
    busy = stamps[-1] - stamps[0] if len(stamps) >= 2 else 0.0
    if len(stamps) == n + 1:
        import numpy as np  # imported by the first timed chunk, not by ``import stagepool``

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

    def absorb(self, start: int, items: list[Any], tries: int, result: TaskResult) -> None:
        self.chunks += 1
        if isinstance(result, LaneDied):
            self._death(start, items, tries, result)
        elif isinstance(result, Cancelled):
            for i in range(start, start + len(items)):
                error = TaskCancelled(f"item {i} was cancelled before it ran: {result.reason}")
                error.__cause__ = result.cause  # the backend's own failure, if that was why
                self.final(i, "cancelled", error, tries)
        else:
            self._answer(start, items, tries, result)

    def _answer(self, start: int, items: list[Any], tries: int, result: Any) -> None:
        try:
            answer: ChunkResult = self.codec.decode(result)
        except Exception as exc:
            if len(items) > 1:
                self._halve(start, items, tries)
            else:
                self.final(start, "serialization", unpickled_result_error(start, exc), tries)
            return
        durations, busy = durations_of(answer.stamps, len(answer.values))
        self.busy += busy
        self.sizer.observe(len(answer.values), busy)
        errors = answer.errors or {}
        if len(items) > 1 and any(info.kind == "unpickle" for info in errors.values()):
            self._halve(start, items, tries)  # which argument would not unpickle? find it
            return
        for offset, info in errors.items():
            kind, error, tb = rebuild_error(info, start + offset)
            self.failure_or_retry(start + offset, items[offset], kind, error, tries, tb,
                                  durations[offset], answer.pid)
        self.ready.append(Run(start, answer.values, durations, answer.pid, tries,
                              frozenset(errors)))
        self.done += len(answer.values) - len(errors)

    def _death(self, start: int, items: list[Any], tries: int, died: LaneDied) -> None:
        if died.offset < 0 and len(items) > 1:
            self._halve(start, items, tries)
            return
        stage = "running" if died.offset >= 0 else "unpickling, running or pickling the data of"
        offset = max(0, died.offset)
        index = start + offset
        limit = item_timeouts(self.timeout, [items[offset]], index) if died.reason == "timeout" else None
        seconds = limit[0] if isinstance(limit, tuple) else float("nan")
        kind, error = death_failure(died, index, stage, seconds)
        self.failure_or_retry(index, items[offset], kind, error, tries, None, 0.0, died.pid)
        # The innocent: what ran before (results lost with the worker) and what had not started.
        if offset > 0:
            self.again.appendleft(Resend(0.0, start, items[:offset], tries))
        if offset + 1 < len(items):
            self.again.appendleft(Resend(0.0, index + 1, items[offset + 1:], tries))

    def _halve(self, start: int, items: list[Any], tries: int) -> None:
        mid = len(items) // 2
        self.again.appendleft(Resend(0.0, start + mid, items[mid:], tries))
        self.again.appendleft(Resend(0.0, start, items[:mid], tries))

    def failure_or_retry(self, index: int, item: Any, kind: Kind, error: Exception,
                         tries: int, tb: str | None, duration: float, pid: int | None) -> None:
        policy = self.policy
        if tries <= policy.retries and retryable(policy.retry_on, kind, error):
            self.retried += 1
            delay = policy.backoff * 2 ** (tries - 1)
            self.again.append(Resend(time.monotonic() + delay, index, [item], tries + 1))
            return
        self.final(index, kind, error, tries, tb, duration, pid)

    def final(self, index: int, kind: Kind, error: Exception, tries: int,
              tb: str | None = None, duration: float = 0.0, pid: int | None = None) -> None:
        self.ready.append(Fail(index, Failure(kind, error, tb, duration, pid, tries)))
        self.failed += 1
        self.done += 1

