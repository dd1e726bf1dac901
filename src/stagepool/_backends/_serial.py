"""The serial backend: every chunk runs in the calling process, one at a time.

For debugging and fast tests: breakpoints, coverage and profilers see the function as in plain
Python, and the batch driver above it is the same as on every other backend (outcomes, ordering,
retries, progress, the report). A chunk runs inside ``submit_many``, in the thread that submits
it (the batch's thread, or the thread calling ``submit``); its answer is delivered before
``submit_many`` returns.

What it cannot do, by construction: stop a running item (``timeout=`` is refused by the engine),
survive an item that kills the process (a segfault or ``os._exit`` ends the caller), kill running
work on cancel (it finishes), or cap memory per worker. A ``KeyboardInterrupt`` inside an item is
the caller's own Ctrl-C here, so it propagates instead of becoming the item's error.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .. import _shared
from .._errors import EngineClosed
from .._worker import failed_chunk
from .._worker_loop import (
    F_CHUNK,
    F_OFFSET,
    F_PHASE,
    F_START,
    PHASE_IDLE,
    ChunkResult,
    Scratch,
    run_chunk,
)
from ._protocol import BackendOptions, Cancelled, Capabilities, Encoded, Group, LaneState, Task

__all__ = ["InProcessCodec", "SerialBackend"]

CAPABILITIES = Capabilities(exact_blame=True, survives_crash=False, hard_timeouts=False,
                            kills_running=False, shared_memory=False, memory_limits=False,
                            processes=False, serializes=False)


class InProcessCodec:
    """Nothing is encoded: tasks carry the objects themselves."""

    def function(self, fn: Callable[..., Any]) -> tuple[int, Any]:
        return 0, fn

    def encode(self, items: list[Any], arena: int | None, budget: int | None = None) -> Encoded:
        return Encoded(items, 0)  # the objects themselves: no copy, whatever the budget

    def keep(self, encoded: Encoded, items: list[Any]) -> list[Any]:
        return items

    def decode(self, result: Any) -> Any:
        return result

    def release(self, items: Any, arena: int | None) -> None:
        pass

    def drop(self, result: Any) -> None:
        pass

    def open_arena(self, arena: int) -> None:
        pass

    def close_arena(self, arena: int) -> None:
        pass


class SerialBackend:
    """Runs each task when it is submitted, in the submitting thread, one task at a time."""

    def __init__(self, options: BackendOptions) -> None:
        self._codec = InProcessCodec()
        self._lock = threading.RLock()  # re-entrant: an item may itself call the engine
        self._closed = False
        self._init_error: BaseException | None = None
        self._shared = _shared.freeze(options.shared)  # read-only arrays, as in a worker
        self._slot = Scratch()  # what run_chunk is on: lane_states() reads it
        if options.initializer is not None:
            try:
                with _shared.serving(self._shared):
                    options.initializer(*options.initargs)
            except KeyboardInterrupt:  # the caller's own Ctrl-C, as inside an item
                raise
            except BaseException as exc:  # as in a worker (SystemExit too): every item fails
                self._init_error = exc

    @property
    def workers(self) -> int:
        return 1

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    @property
    def codec(self) -> InProcessCodec:
        return self._codec

    def check_open(self) -> None:
        if self._closed:
            raise EngineClosed("this engine has been shut down; create a new Engine")

    def submit_many(self, tasks: list[Task]) -> None:
        self.check_open()
        for task in tasks:
            self._run(task)

    def _run(self, task: Task) -> None:
        if task.group.cancelled or self._closed or (
                task.on_start is not None and not task.on_start(task)):
            task.on_done(task, Cancelled("batch cancelled" if task.group.cancelled
                                         else "the engine was shut down"))
            return
        with self._lock:
            result: ChunkResult
            if self._init_error is not None:
                result = failed_chunk(task.n_items, "error", self._init_error,
                                      "the initializer failed")
            else:
                try:
                    with _shared.serving(self._shared):
                        result = run_chunk(task.fn, task.items,
                                           per_item_clock=task.per_item_clock,
                                           passthrough=(KeyboardInterrupt,), record=self._slot,
                                           chunk_id=task.id)
                finally:
                    self._slot.ints[F_PHASE] = PHASE_IDLE
        task.on_done(task, result)

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        group.cancelled = True  # nothing is ever queued; the running chunk finishes

    def withdraw_task(self, task: Task) -> None:
        pass  # a task runs as it is submitted: never queued

    def worker_pids(self) -> list[int]:
        return [os.getpid()]  # the process that runs the items (outcomes name it too)

    def lane_states(self) -> list[LaneState]:
        """This process: on the task ``run_chunk`` runs (seen from another thread), or idle."""
        ints, floats = self._slot.ints, self._slot.floats
        offset, since = int(ints[F_OFFSET]), float(floats[F_START])  # offset first (run_chunk)
        if ints[F_PHASE] == PHASE_IDLE:
            return [LaneState(str(os.getpid()), 0, -1, None)]
        return [LaneState(str(os.getpid()), int(ints[F_CHUNK]), offset, since)]

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        self._closed = True
