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
import multiprocessing.process
import os
import pickle
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from loky.backend.context import get_context

from ... import _shm
from ..._errors import EngineClosed
from ..._resources import kill_group, kill_tree, rss_of
from ..._worker import FN_CACHE_SIZE, PHASE_ENCODE, PHASE_IDLE, PHASE_INIT, PHASE_RUN, TaskHeader, WorkerSetup
from .._codec import SharedMemoryCodec
from .._fairshare import FairShare
from .._protocol import (
    BackendOptions,
    Cancelled,
    Capabilities,
    DeathReason,
    Group,
    LaneDied,
    Task,
    TaskResult,
)
from ._lanes import Lane, readable, start_lane
from ._limits import POLL_INTERVAL, deadline_of, wait_seconds
from ._record import SharedRecord

__all__ = ["LocalBackend"]

CAPABILITIES = Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                            kills_running=True, shared_memory=True, memory_limits=True,
                            processes=True, serializes=True)

# A worker that dies this many times in a row before finishing anything is not respawned blindly.
STARTUP_FAILURE_LIMIT = 3
STOP_JOIN_TIMEOUT = 5.0
# How long shutdown(cancel_pending=True) waits for the pool thread to start idle workers before
# cancelling the rest itself: one turn of the loop, unless it is respawning a worker (seconds).
CANCEL_TURN_TIMEOUT = 10.0
DATA_LIMIT_HEADROOM = 512 * 1024 * 1024


def _notify(task: Task, result: TaskResult) -> None:
    """Deliver a result; a faulty callback must never take the pool thread down with it. Not
    even a BaseException: a future's done-callbacks run inside ``on_done``, and one that calls
    ``sys.exit()`` would end the pool thread without a word, leaving every later call waiting.

    The input segments of ``task.items`` are the callback's to free (see ``Task``)."""
    try:
        task.on_done(task, result)
    except BaseException:  # reported, not fatal
        print("stagepool: a task's completion callback raised (ignored):", file=sys.stderr)
        traceback.print_exc()


def _ran(phase: int, offset: int, task: Task) -> int:
    """How many items of a dead worker's chunk had finished, from the phase it died in."""
    if phase == PHASE_RUN:
        return max(0, offset)
    return task.n_items if phase == PHASE_ENCODE else 0  # encoding results / still decoding


class LocalBackend:
    """A fixed number of worker processes, each fed through its own pipe by one pool thread."""

    def __init__(self, options: BackendOptions, *, kill_grace: float = 0.5) -> None:
        self._workers = workers = options.workers
        self._pid = os.getpid()  # the workers' parent: a forked child must leave them alone
        self._initializer, self._initargs = options.initializer, tuple(options.initargs)
        self._env = dict(options.env)
        self._max_rss, self._max_tasks = options.max_rss, options.max_tasks
        self._init_timeout = options.init_timeout
        self._kill_grace = kill_grace
        # Private writable memory may reach twice the RSS cap (plus room for the interpreter and
        # BLAS buffers) before an allocation fails with MemoryError inside the item.
        max_rss = options.max_rss
        self._data_limit = None if max_rss is None else 2 * max_rss + DATA_LIMIT_HEADROOM
        self._shm_threshold = options.shm_threshold
        self._writable_inputs = options.writable_inputs
        self._codec = SharedMemoryCodec(options.shm_threshold)
        _shm.sweep_stale()  # shared memory of engines whose process died without cleanup
        self._ctx = get_context("loky")
        self._record = SharedRecord(4 * (workers + 1))
        self._free_slots = list(range(4 * (workers + 1)))[::-1]
        self._queue = FairShare()
        self._lock = self._queue.lock
        self._closed = False
        self._failure: BaseException | None = None  # why the pool thread stopped on its own
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
        self._leaving: dict[Lane, float] = {}
        self._lanes: list[Lane] = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, name="stagepool-pool", daemon=True)
        self._thread.start()
        _live_backends.add(self)

    # ---- the Backend protocol ---------------------------------------------------------------

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    @property
    def codec(self) -> SharedMemoryCodec:
        return self._codec

    def check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> EngineClosed:
        failure = self._failure
        if failure is None:
            return EngineClosed("this engine has been shut down; create a new Engine")
        error = EngineClosed(
            f"this engine stopped serving: its pool thread failed with {type(failure).__name__}: "
            f"{failure} (a stagepool bug: please report it); create a new Engine")
        error.__cause__ = failure
        return error

    def submit_many(self, tasks: list[Task]) -> None:
        """Queue tasks with one lock and one wake-up of the pool thread: each wake-up costs a GIL
        hand-off, which on a busy 2-core machine is a scheduling delay of up to a millisecond."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            refused = [task for task in tasks if not self._queue.queue_locked(task)]
        if len(refused) < len(tasks):
            self._wake()
        for task in refused:
            _notify(task, Cancelled("batch cancelled"))

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
        if self._queue.withdraw_task(task):
            _notify(task, Cancelled("future cancelled"))

    def _withdraw_now(self, group: Group, kill_running: bool) -> None:
        for task in self._queue.withdraw(group):
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
        if cancel_pending:
            self._cancel_queued(start_idle=not kill)
        with self._lock:
            self._stopping = True
            self._kill_all = self._kill_all or kill
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            try:
                self._thread.join()
            except BaseException:  # Ctrl-C while waiting for a hung item: kill it, then go
                with self._lock:
                    self._kill_all = True
                self._wake()
                raise

    def _cancel_queued(self, *, start_idle: bool) -> None:
        """Cancel the queued tasks; with ``start_idle``, idle workers first take the tasks they
        would have taken at the pool thread's next turn. Submitting 50 calls and at once shutting
        down with cancel_futures=True cancelled all 50 while every worker sat idle (the standard
        library starts the calls already handed to its call queue)."""
        if start_idle and self._thread.is_alive() and threading.current_thread() is not self._thread:
            turn = threading.Event()

            def start_then_cancel() -> None:
                self._dispatch()
                self._cancel_queued(start_idle=False)
                turn.set()

            self._call_in_pool(start_then_cancel)
            deadline = time.monotonic() + CANCEL_TURN_TIMEOUT
            while self._thread.is_alive() and time.monotonic() < deadline:  # it may stop first
                if turn.wait(0.05):
                    return
        for task in self._queue.drain():
            _notify(task, Cancelled("the engine was shut down"))

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
        except BaseException as exc:  # a bug: close loudly rather than leave callers waiting
            self._fail(exc)
        finally:
            self._close_everything()

    def _fail(self, exc: BaseException) -> None:
        """The pool thread cannot go on: refuse new work (``EngineClosed`` with ``exc`` as its
        cause) and say so; ``_close_everything`` then answers every task still owed one."""
        with self._lock:
            self._closed = True
            self._failure = exc
        print("stagepool: the pool thread failed; the engine is closed, its pending tasks are "
              "cancelled and later calls raise EngineClosed:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)

    def _step(self) -> bool:
        """One turn of the pool loop; returns True when the pool has fully stopped."""
        by_obj: dict[Any, tuple[str, Lane | None]] = {self._wake_r: ("wake", None)}
        for lane in self._lanes:
            by_obj[lane.process.sentinel] = ("died", lane)
            by_obj[lane.stderr] = ("stderr", lane)
            if lane.tasks:
                by_obj[lane.conn] = ("result", lane)
        for lane in self._leaving:
            by_obj[lane.process.sentinel] = ("left", lane)
            by_obj[lane.stderr] = ("stderr", lane)
        ready = wait(list(by_obj), timeout=wait_seconds(self._next_wake(), time.monotonic()))
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
                    owner.forward_stderr()
            elif owner not in self._lanes:
                continue
            elif what == "stderr":
                owner.forward_stderr()
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

    def _receive(self, lane: Lane) -> None:
        if not self._receive_one(lane):
            lane.process.join(1.0)  # it is dying: let the sentinel path account for it
            self._bury(lane)

    def _receive_one(self, lane: Lane, *, dying: bool = False) -> bool:
        """Take one answer from a worker; False when its pipe is broken (the worker is dying)."""
        try:
            blob = lane.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        _shm.claim(blob)  # ours now: a sweep after this worker's death must not free it
        task = lane.tasks.popleft()
        lane.items_done += task.n_items
        if lane.quota is not None:
            lane.quota -= task.n_items
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

    def _bury(self, lane: Lane) -> None:
        """A worker died: blame the item it was running, requeue what it had not started."""
        if lane.kill_reason is None:  # else _kill's kill_tree gives the group its grace, then this
            kill_group(lane.pid)  # what its items started dies with it (before the reaping join)
        lane.process.join(1.0)
        while lane.tasks and readable(lane.conn):  # answers it sent before dying still count
            if not self._receive_one(lane, dying=True):
                break
        _shm.sweep(os.getpid(), f"w{lane.pid}")  # results it made but never sent
        self._lanes.remove(lane)
        chunk, offset, phase, _start = self._record.state(lane.slot)
        tasks = list(lane.tasks)
        lane.tasks.clear()
        if phase == PHASE_INIT and lane.kill_reason in (None, "init_timeout"):
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
                            reason, lane.last_words(), ran=_ran(phase, offset, tasks[0]))
        else:
            requeue = tasks
        if started:  # it took a task, so start-up works: that task killed it
            self._startup_failures = 0
        elif not lane.answered and lane.kill_reason is None:
            self._startup_failures += 1
        self._release(lane)
        for task in self._queue.queue(requeue, front=True):
            _notify(task, Cancelled("batch cancelled"))
        if started:
            _notify(tasks[0], died)
        if not self._kill_all:  # a graceful shutdown still owes the requeued tasks an answer
            self._respawn_after_death()

    def _fail_initializer(self, lane: Lane, tasks: list[Task]) -> None:
        """The worker died in the initializer (segfault, os._exit): a new one would most likely
        die the same way, so none is started, and every task, queued or yet to come, is answered
        with this death (_dispatch), as when the initializer raises."""
        if self._init_died is None:
            name = getattr(self._initializer, "__qualname__", repr(self._initializer))
            module = getattr(self._initializer, "__module__", None)
            reason: DeathReason = lane.kill_reason or "initializer"  # died in it, or hung there
            self._init_died = LaneDied(
                lane.pid, lane.process.exitcode, -1, reason, lane.last_words(), ran=0,
                initializer=f"{module}.{name}" if module else name)
        for task in tasks:
            _notify(task, self._init_died)

    def _respawn_after_death(self) -> None:
        if self._startup_failures >= STARTUP_FAILURE_LIMIT:
            # Workers die before doing anything: fail the queue instead of respawning forever.
            for task in self._queue.drain():
                _notify(task, LaneDied(0, None, -1, "crash",
                                       "workers keep dying at start-up; see stderr", ran=0))
            self._startup_failures = STARTUP_FAILURE_LIMIT - 1
        time.sleep(min(2.0, 0.05 * 2 ** self._startup_failures) if self._startup_failures else 0)
        self._lanes.append(self._spawn())

    def _release(self, lane: Lane) -> None:
        lane.close()
        self._free_slots.append(lane.slot)

    def _retire(self, lane: Lane) -> None:
        """Tell a drained worker to stop and start a fresh one in its place at once (unless the
        pool is stopping with nothing queued); the old one is reaped when it has exited (killed
        if it takes longer than STOP_JOIN_TIMEOUT)."""
        with contextlib.suppress(OSError):
            lane.conn.send_bytes(b"")
        self._lanes.remove(lane)
        self._leaving[lane] = time.monotonic() + STOP_JOIN_TIMEOUT
        # Stopping gracefully still owes the queued tasks a worker: without this replacement,
        # max_tasks_per_worker=1 and shutdown(wait=True) hung forever (CPython gh-115634).
        if not self._stopping or (self._queue and not self._kill_all):
            self._lanes.append(self._spawn())

    def _reap(self, lane: Lane) -> None:
        """A leaving worker exited: collect it, pass on its last words, free its slot."""
        kill_group(lane.pid)  # what its items left running
        lane.process.join(1.0)
        lane.forward_stderr()
        del self._leaving[lane]
        self._release(lane)

    def _expire_leaving(self) -> None:
        now = time.monotonic()
        for lane, deadline in list(self._leaving.items()):
            if now >= deadline and lane.process.exitcode is None:
                kill_tree(lane.pid, grace=0)  # its sentinel fires next turn: then _reap
                self._leaving[lane] = float("inf")

    def _spawn(self) -> Lane:
        if not self._free_slots:  # every spare slot held by workers slow to leave: wait for one
            oldest = next(iter(self._leaving))
            if oldest.process.exitcode is None:
                oldest.process.join(max(0.0, self._leaving[oldest] - time.monotonic()))
                kill_tree(oldest.pid, grace=0)
            self._reap(oldest)
        slot = self._free_slots.pop()
        self._record.reset(slot)
        setup = WorkerSetup(self._record.path, slot, os.getpid(), self._initializer,
                            self._initargs, self._data_limit, self._shm_threshold,
                            self._writable_inputs)
        return start_lane(self._ctx, setup, self._env, self._max_tasks)

    # ---- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._init_died is not None:
            for waiting in self._queue.drain():
                _notify(waiting, self._init_died)
            return
        for prefetch in (False, True):  # fill idle workers first, then prefetch onto busy ones
            for lane in list(self._lanes):
                if bool(lane.tasks) != prefetch:
                    continue
                task = self._queue.take(lane.can_take)
                if task is None or not self._starts(task):
                    continue
                self._send(lane, task)

    @staticmethod
    def _starts(task: Task) -> bool:
        """Ask the task's ``on_start`` whether it still goes; if not (or if the hook raises: that
        fails this task only, never the pool thread), answer it ``Cancelled``."""
        if task.on_start is None:
            return True
        try:
            if task.on_start(task):
                return True
            result = Cancelled("future cancelled")
        except BaseException as exc:
            result = Cancelled(f"its start hook raised {type(exc).__name__}: {exc}", exc)
        _notify(task, result)
        return False

    def _send(self, lane: Lane, task: Task) -> None:
        first = task.fn_key not in lane.fn_keys
        header = pickle.dumps(TaskHeader(task.id, task.fn_key, task.fn if first else None,
                                         task.n_items, task.timeouts is not None,
                                         task.per_item_clock))
        lane.tasks.append(task)
        try:
            lane.conn.send_bytes(header)
            lane.conn.send_bytes(task.items)
        except OSError:
            return  # the worker is dying; _bury requeues the task
        if first:  # the same first-in-first-out eviction as the worker's cache
            lane.fn_keys[task.fn_key] = None
            if len(lane.fn_keys) > FN_CACHE_SIZE:
                del lane.fn_keys[next(iter(lane.fn_keys))]

    # ---- limits: timeouts and memory ------------------------------------------------------------

    def _next_wake(self) -> float | None:
        now = time.monotonic()
        wakes = [d for lane in self._lanes
                 for d in (self._deadline(lane, now), self._init_deadline(lane)) if d is not None]
        if self._max_rss is not None and any(lane.tasks for lane in self._lanes):
            wakes.append(now + POLL_INTERVAL)
        wakes.extend(self._leaving.values())
        return min(wakes, default=None)

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

    def _deadline(self, lane: Lane, now: float) -> float | None:
        if not lane.tasks or lane.kill_reason is not None:
            return None
        return deadline_of(lane.tasks[0], self._record.state(lane.slot), now)

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for lane in list(self._lanes):
            deadline = self._deadline(lane, now)
            init_deadline = self._init_deadline(lane)
            if init_deadline is not None and now >= init_deadline:
                self._kill(lane, "init_timeout")  # _bury then fails every task, naming it
            elif deadline is not None and now >= deadline and lane.tasks:
                offset = self._record.offset(lane.slot)
                self._kill(lane, "timeout", offset)
            elif (self._max_rss is not None and lane.tasks and lane.kill_reason is None
                  and self._running_item(lane)):
                rss = rss_of(lane.pid) or 0
                if rss > 2 * self._max_rss:  # one item blowing far past the cap: stop it now
                    offset = self._record.offset(lane.slot)
                    self._kill(lane, "memory", offset)

    def _running_item(self, lane: Lane) -> bool:
        """Whether the worker is inside one of its chunk's items. Only then is its memory an
        item's fault: a worker killed while starting (a cap below a fresh worker's size) would
        blame no item, and its chunk would be requeued onto the next worker, killed alike, forever."""
        state = self._record.state(lane.slot)
        return state.chunk == lane.tasks[0].id and state.phase == PHASE_RUN

    def _kill(self, lane: Lane, reason: DeathReason, offset: int = -1) -> None:
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
                offset = self._record.offset(lane.slot)
                self._kill(lane, "cancelled", offset)

    def _kill_everything(self) -> None:
        for lane in self._lanes:
            if lane.kill_reason is None:
                lane.kill_reason = "cancelled"
                kill_tree(lane.pid, grace=0)

    # ---- stopping ----------------------------------------------------------------------------

    def _maybe_stop(self) -> bool:
        with self._lock:
            if not self._stopping or (self._queue and not self._kill_all):
                return False
        if any(lane.tasks for lane in self._lanes):
            return False
        for lane in list(self._lanes):  # all told at once: they exit side by side
            self._retire(lane)
        return not self._leaving

    def _close_everything(self) -> None:
        ended = Cancelled("the engine was shut down") if self._failure is None else Cancelled(
            f"the engine's pool thread failed ({type(self._failure).__name__}: {self._failure})",
            self._failure)
        for lane in list(self._leaving):
            kill_tree(lane.pid, grace=0)
            self._reap(lane)
        for lane in list(self._lanes):
            kill_tree(lane.pid, grace=0)
            for task in lane.tasks:
                _notify(task, ended)
            self._release(lane)
        self._lanes.clear()
        for task in self._queue.drain():
            _notify(task, ended)
        # A wake-up after this point must not write: the fd number may already belong to a file
        # or socket opened elsewhere in the process (withdraw() can run at any time, even late).
        self._wake_pending = True
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._record.close()
        _live_backends.discard(self)


_live_backends: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


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
def _at_exit() -> None:
    """Interpreter exit. An engine shut down without waiting (``shutdown(wait=False)``) finishes
    its queued and running work first, as the standard library's executors do: the caller asked
    for that work. An engine left open must not hang the exit: its workers are killed now."""
    for backend in list(_live_backends):
        with backend._lock:
            finish = backend._stopping and not backend._kill_all
        backend.shutdown(wait=True, cancel_pending=not finish, kill=not finish)
