"""A lane is one worker process and what the pool thread knows of it: its duplex pipe, the read
end of its stderr, the tasks sent to it (the first is running, the others prefetched), and the
state that decides whether it can take more work, must be retired, or is being killed.

This module is the OS side of a lane (starting the process, forwarding its stderr, closing its
pipes); the decisions live in the pool (``_pool``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any

from ..._wire import TaskHeader, pack_task
from ..._worker import FN_CACHE_SIZE, PHASE_RUN, WorkerSetup, lane_main
from .._protocol import DeathReason, Task
from ._record import SharedRecord
from ._stderr import WorkerStderr

__all__ = ["PREFETCH_MAX_BYTES", "Lane", "open_lane", "readable", "start_lane"]

# A task is prefetched onto a busy worker (to hide the round trip) only if its pickled items fit
# in an empty pipe, so the send can never block while that worker is itself blocked writing a big
# result (the classic two-full-pipes deadlock), and only if both chunks are expected to be short
# (a chunk queued behind a long one would idle another worker at the tail of a batch).
PREFETCH_MAX_BYTES = 32 * 1024
PREFETCH_MAX_SECONDS = 0.005


@dataclasses.dataclass(eq=False)
class Lane:
    slot: int
    process: Any
    conn: Connection
    stderr: Connection  # the read end of the worker's fd 2
    err: WorkerStderr  # what came out of it: logged by line, its tail kept for reports
    record: SharedRecord | None = None  # where the worker says which item it is on
    tasks: collections.deque[Task] = dataclasses.field(default_factory=collections.deque)
    fn_keys: dict[int, None] = dataclasses.field(default_factory=dict)  # mirrors _FnCache
    items_done: int = 0
    quota: int | None = None  # items it may still be given (max_tasks_per_worker), None: any
    answered: bool = False
    retiring: bool = False
    kill_reason: DeathReason | None = None
    kill_offset: int = -1
    kill_chunk: int = -1  # the chunk (task id) it was killed for: the one it ran then
    kill_at: float | None = None  # time.monotonic() when the pool decided to kill it
    stack_mark: int = -1  # err.total when a hung item's stack was asked for (-1: never)
    replaced: bool = False  # its replacement was started when it was told to die

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def can_take(self, task: Task) -> bool:
        if self.retiring or self.kill_reason is not None:
            return False
        if self.quota is not None and self.quota < task.n_items + sum(t.n_items for t in self.tasks):
            return False  # it would run past max_tasks_per_worker (the pool then recycles it)
        if not self.tasks:
            return True
        if len(self.tasks) > 1 or len(task.items) > PREFETCH_MAX_BYTES:
            return False
        if task.planned and self.tasks[0].planned:
            return True
        return _short(task.expected) and _short(self.tasks[0].expected)

    def used_up(self) -> bool:
        """Whether this idle worker, refused a task, should be recycled: it ran items and has
        less of ``max_tasks_per_worker`` left than the task holds (not merely leaving)."""
        return (self.quota is not None and self.items_done > 0 and not self.retiring
                and self.kill_reason is None)

    def send(self, task: Task) -> None:
        """Hand the worker a task (its function only the first time). A broken pipe is ignored:
        the worker is dying, and the pool thread's burial requeues the task."""
        first = task.fn_key not in self.fn_keys
        message, items = pack_task(TaskHeader(task.id, task.fn_key, task.fn if first else None,
                                              task.n_items, task.timeouts is not None,
                                              task.per_item_clock, task.budget or 0.0),
                                   task.items)
        self.tasks.append(task)
        try:
            self.conn.send_bytes(message)
            if items is not None:
                self.conn.send_bytes(items)
        except OSError:
            return
        if first:  # the same first-in-first-out eviction as the worker's cache
            self.fn_keys[task.fn_key] = None
            if len(self.fn_keys) > FN_CACHE_SIZE:
                del self.fn_keys[next(iter(self.fn_keys))]

    def forward_stderr(self) -> None:
        """Log what the worker wrote to stderr, line by line with its item (``_stderr``)."""
        while True:
            # Where the worker is, taken before the read: os.read lets go of the GIL, and a busy
            # parent can take it back after a failed item's worker, which waits for this read
            # (_worker_stderr.let_parent_read), has moved on and been seen on its next item.
            position = self._position()
            try:
                data = os.read(self.stderr.fileno(), 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.err.feed(data, *position)

    def running_item(self) -> int | None:
        """The batch index of the item the worker is running now (None: none, or unknown)."""
        return self._position()[0]

    def _position(self) -> tuple[int | None, tuple[int, int] | None]:
        """The running item's batch index (None: none, or unknown), and (chunk, offset): where
        the worker is, even in a task that is not a batch's (None: between items)."""
        if not self.tasks or self.record is None:
            return None, None
        state = self.record.state(self.slot)
        if state.chunk != self.tasks[0].id or state.phase != PHASE_RUN or state.offset < 0:
            return None, None
        task = self.tasks[0]
        item = (None if task.first < 0 else task.first + state.offset) if task.indices is None \
            else task.indices[state.offset]
        return item, (state.chunk, state.offset)

    def last_words(self) -> str:
        """The tail of its stderr, read to the end now (what it wrote just before dying), its
        last unfinished line logged too."""
        self.forward_stderr()
        self.err.flush()
        return self.err.tail.decode("utf-8", "replace").strip()

    def hung_stack(self) -> str:
        """What the worker wrote since its stack was asked for (``stack_mark``), if it was."""
        return "" if self.stack_mark < 0 else self.err.since(self.stack_mark)

    def close(self) -> None:
        self.forward_stderr()  # nothing it wrote is lost, its last unfinished line included
        self.err.flush()
        close_sentinel = getattr(self.process, "close_sentinel", None)  # a template's child
        if close_sentinel is not None:
            close_sentinel()
        with contextlib.suppress(OSError):
            self.conn.close()
        with contextlib.suppress(OSError):
            self.stderr.close()


def _short(expected: float | None) -> bool:
    # Unknown counts as long: a task of unknown length (a submit, a batch's first chunks) may be
    # a 1000-second one, and a chunk queued behind it would wait while another worker idles.
    return expected is not None and expected < PREFETCH_MAX_SECONDS


def readable(conn: Connection) -> bool:
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return False


def start_lane(ctx: Any, setup: WorkerSetup, env: dict[str, str], quota: int | None,
               record: SharedRecord | None = None) -> Lane:
    """Start a worker process (loky's context: fork+exec) for ``setup.slot``."""

    def launch(conn: Connection, err: Connection) -> Any:
        process = ctx.Process(target=lane_main, args=(conn, err, setup), env=env,
                              name=f"stagepool-worker-{setup.slot}")
        # loky relaunches its resource tracker here if it died, with a UserWarning. Under
        # warnings-as-errors (``-W error``, pytest's filterwarnings) that warning raised out of
        # the pool thread and closed the engine, though the worker starts without the tracker.
        # Only that warning is shown rather than raised (the filter is process-wide while a
        # worker starts: anything wider would change other threads' warnings meanwhile).
        with warnings.catch_warnings():
            warnings.filterwarnings("default", message="resource_tracker", category=UserWarning)
            process.start()
        return process

    return open_lane(setup.slot, quota, launch, record)


def open_lane(slot: int, quota: int | None, launch: Callable[[Connection, Connection], Any],
              record: SharedRecord | None = None) -> Lane:
    """A lane for the process ``launch`` starts on the child's ends of a new duplex pipe and
    stderr pipe (closed here once the child has them; all four if the launch fails)."""
    parent_end, child_end = Pipe(duplex=True)
    err_read, err_write = Pipe(duplex=False)
    try:
        process = launch(child_end, err_write)
    except BaseException:
        parent_end.close()
        err_read.close()
        raise
    finally:
        child_end.close()
        err_write.close()
    os.set_blocking(err_read.fileno(), False)
    return Lane(slot, process, parent_end, err_read, WorkerStderr(process.pid), record,
                quota=quota)
