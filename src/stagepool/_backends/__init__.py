"""Backends run chunk tasks somewhere: local worker processes (loky), a dask cluster, or in-process.

The engine speaks to a backend only through :class:`Backend` and the small value classes below. A
backend never imports the engine, the asyncio bridge or progress; it reports facts (this task's
result bytes, or "its worker died while on item 3") and the engine decides what they mean.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Protocol

__all__ = ["Backend", "Cancelled", "Group", "LaneDied", "Task", "TaskResult"]

_task_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True, slots=True)
class LaneDied:
    """The worker running a task died (or was killed by us) before answering.

    ``offset`` is the position in the chunk of the item it was running (from the worker's shared
    record), or -1 when it was not running an item (decoding, encoding, idle).
    """

    pid: int
    exitcode: int | None
    offset: int
    reason: str  # "crash", "timeout", "memory", "cancelled" or "initializer" (it died in it)
    detail: str = ""  # the last lines the worker wrote to stderr (faulthandler dump included)
    initializer: str = ""  # reason "initializer": the initializer's qualified name


@dataclasses.dataclass(frozen=True, slots=True)
class Cancelled:
    """The task was withdrawn before it ran (shutdown with ``cancel_futures`` or a cancelled batch)."""

    reason: str


TaskResult = bytes | LaneDied | Cancelled


class Group:
    """The tasks of one batch (or one ``submit``): served round-robin against other groups.

    Once ``cancelled``, no task of the group is started again, even one that was requeued
    because its worker died after the cancellation.
    """

    __slots__ = ("cancelled", "served")

    def __init__(self) -> None:
        self.cancelled = False
        self.served = 0.0  # estimated seconds of work dispatched: the backend's fair share


@dataclasses.dataclass(eq=False, slots=True)
class Task:
    """One chunk on its way to a worker.

    ``items_blob`` is already pickled by the submitting thread (the backend thread never pickles);
    ``fn_blob`` is sent once per worker for each ``fn_key``. ``on_done`` is called exactly once,
    from a backend thread, with the result; it must be quick and must not block. From then on it
    owns the shared-memory segments ``items_blob`` names: the submitter may still need the inputs
    (to send some again), so the backend never frees them itself.
    """

    group: Group
    fn_key: int
    fn_blob: bytes
    items_blob: bytes
    n_items: int
    on_done: Callable[[Task, TaskResult], None]
    timeouts: tuple[float, ...] | None = None  # per item, seconds; None = no limit
    expected: float | None = None  # the engine's estimate of the chunk's duration, seconds
    per_item_clock: bool = True  # False for tiny items: durations become the chunk's mean
    # Called by the backend thread right before the task goes to a worker (again after a requeue);
    # False withdraws it instead (answered ``Cancelled``). Quick, must not block.
    on_start: Callable[[Task], bool] | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_task_ids))


class Backend(Protocol):
    """What the engine needs from a place that runs chunks."""

    @property
    def workers(self) -> int: ...

    def submit(self, task: Task) -> None:
        """Queue ``task``; raises ``EngineClosed`` after shutdown."""

    def submit_many(self, tasks: list[Task]) -> None:
        """Queue several tasks at once (one wake-up); raises ``EngineClosed`` after shutdown."""

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Cancel a group's queued tasks (``on_done(Cancelled)``); optionally kill its running ones."""

    def withdraw_task(self, task: Task) -> None:
        """Cancel one queued task (``on_done(Cancelled)``); a running or finished one is left."""

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (empty for remote or in-process backends)."""

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        """Stop the workers. ``wait`` lets queued tasks finish first unless ``cancel_pending``;
        ``kill`` kills running work at once. Every task still owed an answer gets ``Cancelled``."""
