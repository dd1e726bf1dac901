"""Local worker processes, started with loky: the only module that imports loky.

Why not ``loky.ProcessPoolExecutor`` itself? When one of its workers dies it marks the whole
executor broken, fails every pending future with ``TerminatedWorkerError`` and kills the other
workers; and each call pays two thread hand-offs (about 285 us a round trip here, against 45 us for
a direct pipe). We keep loky's process layer (the ``loky`` start method: fork+exec without the
fork-safety problems, cloudpickle for ``__main__`` code, its resource tracker) and give each worker
its own *lane*: a duplex pipe and a slot in a shared record.

    Engine thread(s) --submit(Task)--> pending, per group (round-robin between batches)
                                          |
                                  [pool thread] --send--> lane 0 pipe --> worker 0 (lane_main)
                                          |      --send--> lane 1 pipe --> worker 1
                                          |  <--result bytes-- / <--sentinel: died--
                                  Task.on_done(result | LaneDied | Cancelled)

The pool thread is the only one that touches lanes. It never pickles: items arrive pickled and
results leave as bytes. A worker that dies fails only the task it was running, with the item
offset read from the shared record; tasks prefetched onto it go back to the front of the queue.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import mmap
import multiprocessing.process
import os
import pickle
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from loky.backend.context import get_context

from .. import _transport
from .._errors import EngineClosed
from .._resources import kill_group, kill_tree, rss_of
from .._worker import (
    F_CHUNK,
    F_OFFSET,
    F_PHASE,
    F_START,
    FN_CACHE_SIZE,
    PHASE_IDLE,
    PHASE_INIT,
    PHASE_RUN,
    RECORD_FIELDS,
    WorkerSetup,
    lane_main,
)
from . import Cancelled, Group, LaneDied, Task, TaskResult

__all__ = ["LokyBackend"]

# A task is prefetched onto a busy worker (to hide the round trip) only if its pickled items fit
# in an empty pipe, so the send can never block while that worker is itself blocked writing a big
# result (the classic two-full-pipes deadlock), and only if both chunks are expected to be short
# (a chunk queued behind a long one would idle another worker at the tail of a batch).
PREFETCH_MAX_BYTES = 32 * 1024
PREFETCH_MAX_SECONDS = 0.005
# How often the pool thread looks at the record while some running item has a timeout it cannot
# compute a deadline for yet (the worker has not started the chunk), and at RSS under a memory cap.
POLL_INTERVAL = 0.05
# A worker that dies this many times in a row before finishing anything is not respawned blindly.
STARTUP_FAILURE_LIMIT = 3
STOP_JOIN_TIMEOUT = 5.0
# What a chunk of unknown duration counts for in the fair share (a batch's first chunks).
UNKNOWN_CHUNK_SECONDS = 0.01
DATA_LIMIT_HEADROOM = 512 * 1024 * 1024
# How much of a worker's stderr is kept for the report when it dies.
STDERR_TAIL_BYTES = 16 * 1024
STDERR_TAIL_LINES = 30


class _SharedFile:
    """A memory file the workers open by path: a memfd on Linux (freed with its last user, even
    if the parent is SIGKILLed), else a temporary file removed at close."""

    def __init__(self, name: str, size: int) -> None:
        self._tmp: str | None = None
        if hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
            self.fd = os.memfd_create(name)
            self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        else:  # pragma: no cover - non-Linux
            self.fd, self._tmp = tempfile.mkstemp(prefix=f"{name}-")
            self.path = self._tmp
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)


@dataclasses.dataclass(eq=False)
class _Lane:
    slot: int
    process: Any
    conn: Connection
    stderr: Connection  # the read end of the worker's fd 2
    stderr_tail: bytearray = dataclasses.field(default_factory=bytearray)
    tasks: collections.deque[Task] = dataclasses.field(default_factory=collections.deque)
    fn_keys: dict[int, None] = dataclasses.field(default_factory=dict)  # mirrors _FnCache
    items_done: int = 0
    answered: bool = False
    retiring: bool = False
    kill_reason: str | None = None
    kill_offset: int = -1

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def can_take(self, task: Task) -> bool:
        if self.retiring or self.kill_reason is not None:
            return False
        if not self.tasks:
            return True
        if len(self.tasks) > 1 or len(task.items_blob) > PREFETCH_MAX_BYTES:
            return False
        return _short(task.expected) and _short(self.tasks[0].expected)


def _notify(task: Task, result: TaskResult) -> None:
    """Deliver a result; a faulty callback must never take the pool thread down with it.

    The input segments of ``items_blob`` are the callback's to free (see ``Task``)."""
    try:
        task.on_done(task, result)
    except Exception:  # pragma: no cover - a bug in a callback, reported, not fatal
        import traceback

        traceback.print_exc()


def _readable(conn: Connection) -> bool:
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return False


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


_suffix_minima: dict[int, list[float]] = {}


def _short(expected: float | None) -> bool:
    # Unknown counts as long: a task of unknown length (a submit, a batch's first chunks) may be
    # a 1000-second one, and a chunk queued behind it would wait while another worker idles.
    return expected is not None and expected < PREFETCH_MAX_SECONDS


class LokyBackend:
    """A fixed number of worker processes, each fed through its own pipe by one pool thread."""

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        env: dict[str, str] | None = None,
        max_rss: int | None = None,
        max_tasks: int | None = None,
        kill_grace: float = 0.5,
        shm_threshold: int = 0,
        writable_inputs: bool = False,
    ) -> None:
        self._workers = workers
        self._pid = os.getpid()  # the workers' parent: a forked child must leave them alone
        self._initializer, self._initargs, self._env = initializer, initargs, env or {}
        self._max_rss, self._max_tasks, self._kill_grace = max_rss, max_tasks, kill_grace
        # Private writable memory may reach twice the RSS cap (plus room for the interpreter and
        # BLAS buffers) before an allocation fails with MemoryError inside the item.
        self._data_limit = None if max_rss is None else 2 * max_rss + DATA_LIMIT_HEADROOM
        self._shm_threshold, self._writable_inputs = shm_threshold, writable_inputs
        _transport.sweep_stale()  # shared memory of engines whose process died without cleanup
        self._ctx = get_context("loky")
        self._record_file = _SharedFile("stagepool-record", 8 * RECORD_FIELDS * 4 * (workers + 1))
        self._record_map = mmap.mmap(self._record_file.fd, 0)
        self._ints = memoryview(self._record_map).cast("q")
        self._floats = memoryview(self._record_map).cast("d")
        self._free_slots = list(range(4 * (workers + 1)))[::-1]
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[Group, collections.deque[Task]] = (
            collections.OrderedDict())
        self._closed = False
        self._stopping = False
        self._kill_all = False
        self._startup_failures = 0
        # Set when a worker died in the initializer: every task gets this answer, nothing respawns.
        self._init_died: LaneDied | None = None
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_pending = False
        os.set_blocking(self._wake_w, False)
        # Workers told to stop (recycled, or the pool stopping), with the moment they get killed
        # if they have not exited: reaped when their sentinel fires, never waited for in a loop
        # that also feeds the others.
        self._leaving: dict[_Lane, float] = {}
        self._lanes: list[_Lane] = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, name="stagepool-pool", daemon=True)
        self._thread.start()
        _live_backends.add(self)

    # ---- the Backend protocol ---------------------------------------------------------------

    @property
    def workers(self) -> int:
        return self._workers

    def submit(self, task: Task) -> None:
        self.submit_many([task])

    def submit_many(self, tasks: list[Task]) -> None:
        """Queue tasks with one lock and one wake-up of the pool thread: each wake-up costs a GIL
        hand-off, which on a busy 2-core machine is a scheduling delay of up to a millisecond."""
        with self._lock:
            if self._closed:
                raise EngineClosed("this engine has been shut down; create a new Engine")
            refused = [task for task in tasks if not self._queue_locked(task)]
        if len(refused) < len(tasks):
            self._wake()
        for task in refused:
            _notify(task, Cancelled("batch cancelled"))

    def _queue_locked(self, task: Task, *, front: bool = False) -> bool:
        """Queue a task in its group (the caller holds the lock); False if the group has been
        withdrawn: _withdraw_now may already have emptied its queue, so it would never run."""
        if task.group.cancelled:
            return False
        queue = self._pending.get(task.group)
        if queue is None:
            queue = self._pending[task.group] = collections.deque()
            # A newcomer starts level with the least-served group, not at zero, so it shares
            # the workers instead of taking them all until it has caught up.
            task.group.served = max(task.group.served, min(
                (g.served for g in self._pending if g is not task.group), default=0.0))
        if front:
            queue.appendleft(task)
        else:
            queue.append(task)
        return True

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Never blocks and takes no lock: it may run in a garbage collector's finalizer (an
        abandoned imap generator closing) in the middle of any thread, the pool thread included,
        holding any lock. The flag stops dispatch at once; the pool thread does the rest."""
        group.cancelled = True
        self._call_in_pool(lambda: self._withdraw_now(group, kill_running))

    def withdraw_task(self, task: Task) -> None:
        """One task out of its group's queue, if still queued. Lock-free, like withdraw()."""
        self._call_in_pool(lambda: self._withdraw_task_now(task))

    def _withdraw_task_now(self, task: Task) -> None:
        with self._lock:
            queue = self._pending.get(task.group)
            found = queue is not None and task in queue  # Task compares by identity
            if found:
                queue.remove(task)  # type: ignore[union-attr]
                if not queue:
                    del self._pending[task.group]
        if found:
            _notify(task, Cancelled("future cancelled"))

    def _withdraw_now(self, group: Group, kill_running: bool) -> None:
        with self._lock:
            withdrawn = list(self._pending.pop(group, ()))
        for task in withdrawn:
            _notify(task, Cancelled("batch cancelled"))
        if kill_running:
            self._kill_group(group)

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [lane.pid for lane in self._lanes]

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        if os.getpid() != self._pid:  # a fork's copy (its lock may be held for good): not ours
            return
        with self._lock:
            self._closed = True
            withdrawn = [t for q in self._pending.values() for t in q] if cancel_pending else []
            if cancel_pending:
                self._pending.clear()
        for task in withdrawn:
            _notify(task, Cancelled("the engine was shut down"))
        with self._lock:
            self._stopping = True
            self._kill_all = self._kill_all or kill
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- the pool thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        # One byte in the pipe is enough: a burst of submits between two turns of the pool loop
        # costs one write, not one each. The pool thread drains the pipe, then clears the flag,
        # then looks at the queues: a task queued before a skipped write is seen by that look,
        # and a write after the clear wakes the next turn.
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def _call_in_pool(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)  # deque.append is atomic: no lock, so safe from a finalizer
        self._wake()

    def _run(self) -> None:
        try:
            while not self._step():
                pass
        finally:
            self._close_everything()

    def _step(self) -> bool:
        """One turn of the pool loop; returns True when the pool has fully stopped."""
        by_obj: dict[Any, tuple[str, _Lane | None]] = {self._wake_r: ("wake", None)}
        for lane in self._lanes:
            by_obj[lane.process.sentinel] = ("died", lane)
            by_obj[lane.stderr] = ("stderr", lane)
            if lane.tasks:
                by_obj[lane.conn] = ("result", lane)
        for lane in self._leaving:
            by_obj[lane.process.sentinel] = ("left", lane)
            by_obj[lane.stderr] = ("stderr", lane)
        ready = wait(list(by_obj), timeout=self._next_wake())
        for obj in ready:
            what, owner = by_obj[obj]
            if what == "wake":
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
                # After the read: cleared before it, a byte written in between would be drained
                # with the flag left set, and every later wake-up skipped (a hang).
                self._wake_pending = False
            elif owner is None:
                continue
            elif owner in self._leaving:
                if what == "left":
                    self._reap(owner)
                else:
                    self._forward_stderr(owner)
            elif owner not in self._lanes:
                continue
            elif what == "stderr":
                self._forward_stderr(owner)
            else:
                (self._receive if what == "result" else self._bury)(owner)
        self._expire_leaving()
        self._run_calls()
        self._enforce_limits()
        if self._kill_all:
            self._kill_everything()
        self._dispatch()
        return self._maybe_stop()

    def _run_calls(self) -> None:
        while True:
            try:
                call = self._calls.popleft()
            except IndexError:
                return
            call()

    def _receive(self, lane: _Lane) -> None:
        if not self._receive_one(lane):
            lane.process.join(1.0)  # it is dying: let the sentinel path account for it
            self._bury(lane)

    def _receive_one(self, lane: _Lane, *, dying: bool = False) -> bool:
        """Take one answer from a worker; False when its pipe is broken (the worker is dying)."""
        try:
            blob = lane.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        _transport.claim(blob)  # ours now: a sweep after this worker's death must not free it
        task = lane.tasks.popleft()
        lane.items_done += task.n_items
        lane.answered = True
        self._startup_failures = 0
        _notify(task, blob)
        if self._max_rss is not None and (rss_of(lane.pid) or 0) > self._max_rss:
            lane.retiring = True  # grew past the cap between items: recycle it
        if self._max_tasks is not None and lane.items_done >= self._max_tasks:
            lane.retiring = True
        if lane.retiring and not lane.tasks and not dying:
            self._retire(lane)
        return True

    def _bury(self, lane: _Lane) -> None:
        """A worker died: blame the item it was running, requeue what it had not started."""
        if lane.kill_reason is None:  # else _kill's kill_tree gives the group its grace, then this
            kill_group(lane.pid)  # what its items started dies with it (before the reaping join)
        lane.process.join(1.0)
        while lane.tasks and _readable(lane.conn):  # answers it sent before dying still count
            if not self._receive_one(lane, dying=True):
                break
        _transport.sweep(os.getpid(), f"w{lane.pid}")  # results it made but never sent
        self._lanes.remove(lane)
        base = lane.slot * RECORD_FIELDS
        chunk, offset, phase = (self._ints[base + F_CHUNK], self._ints[base + F_OFFSET],
                                self._ints[base + F_PHASE])
        tasks = list(lane.tasks)
        lane.tasks.clear()
        if phase == PHASE_INIT and lane.kill_reason is None:
            self._fail_initializer(lane, tasks)
            self._release(lane)
            return
        started = bool(tasks) and tasks[0].id == chunk and phase != PHASE_IDLE
        if started:
            requeue = tasks[1:]
            reason = lane.kill_reason or "crash"
            if lane.kill_reason is not None and lane.kill_offset >= 0:
                offset = lane.kill_offset
            died = LaneDied(lane.pid, lane.process.exitcode, offset if phase == PHASE_RUN else -1,
                            reason, self._stderr_tail(lane))
        else:
            requeue = tasks
        if not lane.answered and lane.kill_reason is None:
            self._startup_failures += 1
        self._release(lane)
        with self._lock:
            refused = [t for t in reversed(requeue) if not self._queue_locked(t, front=True)]
        for task in refused:
            _notify(task, Cancelled("batch cancelled"))
        if started:
            _notify(tasks[0], died)
        if not self._kill_all:  # a graceful shutdown still owes the requeued tasks an answer
            self._respawn_after_death()

    def _fail_initializer(self, lane: _Lane, tasks: list[Task]) -> None:
        """The worker died in the initializer (segfault, os._exit): a new one would most likely
        die the same way, so none is started, and every task, queued or yet to come, is answered
        with this death (_dispatch), as when the initializer raises."""
        if self._init_died is None:
            name = getattr(self._initializer, "__qualname__", repr(self._initializer))
            module = getattr(self._initializer, "__module__", None)
            self._init_died = LaneDied(
                lane.pid, lane.process.exitcode, -1, "initializer", self._stderr_tail(lane),
                f"{module}.{name}" if module else name)
        for task in tasks:
            _notify(task, self._init_died)

    def _respawn_after_death(self) -> None:
        if self._startup_failures >= STARTUP_FAILURE_LIMIT:
            # Workers die before doing anything: fail the queue instead of respawning forever.
            with self._lock:
                doomed = [t for q in self._pending.values() for t in q]
                self._pending.clear()
            for task in doomed:
                _notify(task, LaneDied(0, None, -1, "crash",
                                            "workers keep dying at start-up; see stderr"))
            self._startup_failures = STARTUP_FAILURE_LIMIT - 1
        time.sleep(min(2.0, 0.05 * 2 ** self._startup_failures) if self._startup_failures else 0)
        self._lanes.append(self._spawn())

    def _release(self, lane: _Lane) -> None:
        with contextlib.suppress(OSError):
            lane.conn.close()
        with contextlib.suppress(OSError):
            lane.stderr.close()
        self._free_slots.append(lane.slot)

    def _retire(self, lane: _Lane) -> None:
        """Tell a drained worker to stop and start a fresh one in its place at once; the old one
        is reaped when it has exited (killed if it takes longer than STOP_JOIN_TIMEOUT)."""
        with contextlib.suppress(OSError):
            lane.conn.send_bytes(b"")
        self._lanes.remove(lane)
        self._leaving[lane] = time.monotonic() + STOP_JOIN_TIMEOUT
        if not self._stopping:
            self._lanes.append(self._spawn())

    def _reap(self, lane: _Lane) -> None:
        """A leaving worker exited: collect it, pass on its last words, free its slot."""
        kill_group(lane.pid)  # what its items left running
        lane.process.join(1.0)
        self._forward_stderr(lane)
        del self._leaving[lane]
        self._release(lane)

    def _expire_leaving(self) -> None:
        now = time.monotonic()
        for lane, deadline in list(self._leaving.items()):
            if now >= deadline and lane.process.exitcode is None:
                kill_tree(lane.pid, grace=0)  # its sentinel fires next turn: then _reap
                self._leaving[lane] = float("inf")

    def _spawn(self) -> _Lane:
        if not self._free_slots:  # every spare slot held by workers slow to leave: wait for one
            oldest = next(iter(self._leaving))
            if oldest.process.exitcode is None:
                oldest.process.join(max(0.0, self._leaving[oldest] - time.monotonic()))
                kill_tree(oldest.pid, grace=0)
            self._reap(oldest)
        slot = self._free_slots.pop()
        base = slot * RECORD_FIELDS
        self._ints[base + F_CHUNK] = 0
        self._ints[base + F_OFFSET] = -1
        self._ints[base + F_PHASE] = PHASE_IDLE
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        err_read, err_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=lane_main,
            args=(child_end, err_write, WorkerSetup(
                self._record_file.path, slot, os.getpid(), self._initializer, self._initargs,
                self._data_limit, self._shm_threshold, self._writable_inputs)),
            env=self._env,
            name=f"stagepool-worker-{slot}",
        )
        process.start()
        child_end.close()
        err_write.close()
        os.set_blocking(err_read.fileno(), False)
        return _Lane(slot, process, parent_end, err_read)

    def _forward_stderr(self, lane: _Lane) -> None:
        """Copy what the worker wrote to stderr to ours, keeping the last few KiB for reports."""
        while True:
            try:
                data = os.read(lane.stderr.fileno(), 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            lane.stderr_tail += data
            del lane.stderr_tail[:-STDERR_TAIL_BYTES]
            with contextlib.suppress(Exception):
                sys.stderr.write(data.decode("utf-8", "replace"))
                sys.stderr.flush()

    def _stderr_tail(self, lane: _Lane) -> str:
        self._forward_stderr(lane)  # what it wrote just before dying
        lines = lane.stderr_tail.decode("utf-8", "replace").strip().splitlines()
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    # ---- dispatch ----------------------------------------------------------------------------

    def _next_task(self, lane: _Lane) -> Task | None:
        """Fair share by time: the group with the least estimated work served so far goes next
        (a chunk-by-chunk turn would favour the batch whose chunks are bigger)."""
        with self._lock:
            best: Group | None = None
            for group, queue in self._pending.items():
                if group.cancelled:  # withdrawn a moment ago: _withdraw_now answers it
                    continue
                if queue and lane.can_take(queue[0]) and (best is None or
                                                         group.served < best.served):
                    best = group
            if best is None:
                return None
            queue = self._pending[best]
            task = queue.popleft()
            if not queue:
                del self._pending[best]
            best.served += task.expected if task.expected is not None else UNKNOWN_CHUNK_SECONDS
            return task

    def _dispatch(self) -> None:
        if self._init_died is not None:
            with self._lock:
                doomed = [t for q in self._pending.values() for t in q]
                self._pending.clear()
            for waiting in doomed:
                _notify(waiting, self._init_died)
            return
        for prefetch in (False, True):  # fill idle workers first, then prefetch onto busy ones
            for lane in list(self._lanes):
                if bool(lane.tasks) != prefetch:
                    continue
                task = self._next_task(lane)
                if task is None:
                    continue
                if task.on_start is not None and not task.on_start(task):
                    _notify(task, Cancelled("future cancelled"))
                    continue
                self._send(lane, task)

    def _send(self, lane: _Lane, task: Task) -> None:
        first = task.fn_key not in lane.fn_keys
        header = pickle.dumps((task.id, task.fn_key, task.fn_blob if first else None,
                               task.n_items, task.timeouts is not None, task.per_item_clock))
        lane.tasks.append(task)
        try:
            lane.conn.send_bytes(header)
            lane.conn.send_bytes(task.items_blob)
        except OSError:
            return  # the worker is dying; _bury requeues the task
        if first:  # the same first-in-first-out eviction as the worker's cache
            lane.fn_keys[task.fn_key] = None
            if len(lane.fn_keys) > FN_CACHE_SIZE:
                del lane.fn_keys[next(iter(lane.fn_keys))]

    # ---- limits: timeouts and memory ------------------------------------------------------------

    def _next_wake(self) -> float | None:
        now = time.monotonic()
        wake: float | None = None
        for lane in self._lanes:
            deadline = self._deadline(lane, now)
            if deadline is not None:
                wake = deadline if wake is None else min(wake, deadline)
        if self._max_rss is not None and any(lane.tasks for lane in self._lanes):
            wake = now + POLL_INTERVAL if wake is None else min(wake, now + POLL_INTERVAL)
        for deadline in self._leaving.values():
            wake = deadline if wake is None else min(wake, deadline)
        return None if wake is None or wake == float("inf") else max(0.0, wake - now)

    def _deadline(self, lane: _Lane, now: float) -> float | None:
        if not lane.tasks or lane.kill_reason is not None:
            return None
        task, base = lane.tasks[0], lane.slot * RECORD_FIELDS
        timeouts = task.timeouts
        if timeouts is None:
            return None
        offset = self._ints[base + F_OFFSET]  # read before the start time: see _worker.run_chunk
        start = self._floats[base + F_START]
        if self._ints[base + F_CHUNK] != task.id or self._ints[base + F_PHASE] != PHASE_RUN:
            return now + POLL_INTERVAL
        # The item running now, or a later item that starts after this moment: whichever could
        # expire first. (Without the second term a short timeout behind a long one is missed.)
        return min(start + timeouts[offset], now + _later_min(task, offset))

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for lane in list(self._lanes):
            deadline = self._deadline(lane, now)
            if deadline is not None and now >= deadline and lane.tasks:
                offset = self._ints[lane.slot * RECORD_FIELDS + F_OFFSET]
                self._kill(lane, "timeout", offset)
            elif self._max_rss is not None and lane.tasks and lane.kill_reason is None:
                rss = rss_of(lane.pid) or 0
                if rss > 2 * self._max_rss:  # one item blowing far past the cap: stop it now
                    offset = self._ints[lane.slot * RECORD_FIELDS + F_OFFSET]
                    self._kill(lane, "memory", offset)

    def _kill(self, lane: _Lane, reason: str, offset: int = -1) -> None:
        if lane.kill_reason is not None:
            return
        lane.kill_reason, lane.kill_offset = reason, offset
        threading.Thread(target=kill_tree, args=(lane.pid,), kwargs={"grace": self._kill_grace},
                         daemon=True, name="stagepool-kill").start()

    def _kill_group(self, group: Group) -> None:
        # Only workers *running* the group's chunk: a chunk merely prefetched behind another
        # batch's running chunk is short by construction; it runs and its answer is dropped.
        for lane in self._lanes:
            if lane.tasks and lane.tasks[0].group is group:
                offset = self._ints[lane.slot * RECORD_FIELDS + F_OFFSET]
                self._kill(lane, "cancelled", offset)

    def _kill_everything(self) -> None:
        for lane in self._lanes:
            if lane.kill_reason is None:
                lane.kill_reason = "cancelled"
                kill_tree(lane.pid, grace=0)

    # ---- stopping ----------------------------------------------------------------------------

    def _maybe_stop(self) -> bool:
        with self._lock:
            if not self._stopping or (self._pending and not self._kill_all):
                return False
        if any(lane.tasks for lane in self._lanes):
            return False
        for lane in list(self._lanes):  # all told at once: they exit side by side
            self._retire(lane)
        return not self._leaving

    def _close_everything(self) -> None:
        for lane in list(self._leaving):
            kill_tree(lane.pid, grace=0)
            self._reap(lane)
        for lane in list(self._lanes):
            kill_tree(lane.pid, grace=0)
            for task in lane.tasks:
                _notify(task, Cancelled("the engine was shut down"))
            self._release(lane)
        self._lanes.clear()
        with self._lock:
            leftovers = [t for q in self._pending.values() for t in q]
            self._pending.clear()
        for task in leftovers:
            _notify(task, Cancelled("the engine was shut down"))
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ints.release()
        self._floats.release()
        self._record_map.close()
        self._record_file.close()
        _live_backends.discard(self)


_live_backends: weakref.WeakSet[LokyBackend] = weakref.WeakSet()


def _disown_after_fork() -> None:
    """In a child forked from the caller: its copies of the engines have no pool thread and the
    workers are not its children. Forget them, so that its exit neither shuts them down nor has
    multiprocessing join them ("can only join a child process")."""
    children: set[Any] = getattr(multiprocessing.process, "_children", set())
    for backend in list(_live_backends):
        for lane in [*backend._lanes, *backend._leaving]:
            children.discard(lane.process)
    _live_backends.clear()


os.register_at_fork(after_in_child=_disown_after_fork)


@atexit.register
def _kill_leftovers() -> None:
    """An engine left open at interpreter exit must not hang it: kill its workers now."""
    for backend in list(_live_backends):
        backend.shutdown(wait=True, cancel_pending=True, kill=True)
