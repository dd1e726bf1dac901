"""What each worker is doing now: ``Engine.status()``.

    backend.lane_states()  (local: the shared record's slot of each lane; serial: this process;
                            dask: the chunks it sent, item unknown)
      -> LaneState(worker, task id, offset in the task, since)
      -> the live batch that sent that task (a weak registry: batches register as they start)
            maps task + offset to the item's input index (through its cost arrangement, if any)
      -> WorkerStatus(worker, busy, batch, item, seconds)

Reading it costs a few shared-memory reads per worker; it never waits for a worker, so an
``on_progress`` callback may call it after every chunk.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from ._backends import LaneState

__all__ = ["WorkerStatus", "register", "resolve"]


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker, now: idle, or busy on item ``item`` of batch ``batch`` for ``seconds``.

    ``item`` is the input index in that batch (None when the backend cannot say which item of
    its chunk runs: on dask, or while a chunk is being unpickled; or for a ``submit``).
    ``seconds``: how long that item has run (items under ~10 us: their chunk; on dask: the
    chunk); None when unknown. ``batch`` numbers the calls of this process in the order they
    started (``desc`` is the call's ``desc=``, if given)."""

    worker: str  # a pid, or a dask worker's address
    busy: bool
    batch: int | None = None
    item: int | None = None
    seconds: float | None = None
    desc: str | None = None

    def __str__(self) -> str:
        if not self.busy:
            return f"worker {self.worker}: idle"
        what = "a chunk" if self.item is None else f"item {self.item}"
        where = "" if self.batch is None else f" of batch {self.batch}"
        if self.desc:
            where += f" ({self.desc})"
        since = "" if self.seconds is None else f" for {self.seconds:.1f} s"
        return f"worker {self.worker}: busy on {what}{where}{since}"


class _Live(Protocol):
    """What the registry needs of a batch (``_batch.Batch``)."""

    number: int
    in_flight: dict[int, Any]  # task id -> Lot (its ``start``: a position)
    label: Callable[[int], int]  # position -> input index

    @property
    def desc(self) -> str | None: ...


_numbers = itertools.count(1)
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def register(batch: Any) -> int:
    """Note a batch that starts now; return its number. Forgotten when it is collected."""
    with _lock:
        _live.add(batch)
        return next(_numbers)


def resolve(states: list[LaneState]) -> list[WorkerStatus]:
    """Name the batch and input index of each state's task."""
    with _lock:
        batches = list(_live)
    now = time.monotonic()
    return [_one(state, batches, now) for state in states]


def _one(state: LaneState, batches: list[_Live], now: float) -> WorkerStatus:
    if state.task == 0:
        return WorkerStatus(state.worker, False)
    seconds = None if state.since is None else max(0.0, now - state.since)
    for batch in batches:
        lot = batch.in_flight.get(state.task)
        if lot is not None:
            item = None if state.offset < 0 else batch.label(lot.start + state.offset)
            return WorkerStatus(state.worker, True, batch.number, item, seconds, batch.desc)
    return WorkerStatus(state.worker, True, None, None, seconds)  # a submit(), or just finished


# Public classes name the package they are imported from, in reprs and tracebacks.
WorkerStatus.__module__ = "stagepool"
