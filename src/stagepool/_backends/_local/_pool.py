"""Local worker processes: the pool thread and the Backend protocol (the only loky import).

Why not ``loky.ProcessPoolExecutor`` itself? When one of its workers dies it marks the whole
executor broken, fails every pending future with ``TerminatedWorkerError`` and kills the other
workers; and each call pays two thread hand-offs (about 285 us a round trip here, against 45 us for
a direct pipe). Workers are forked from a warm template process (``_template``: no fork of this
threaded process, the stage's modules imported once); where that is not possible we fall back on
loky's process layer (the ``loky`` start method: fork+exec without the fork-safety problems).
Either way each worker gets its own *lane*: a duplex pipe and a slot in a shared record.

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
import multiprocessing.process
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Any

from ... import _shared, _shm
from ..._errors import EngineClosed
from ..._worker import WorkerSetup
from .._codec import SharedMemoryCodec
from .._fairshare import FairShare
from .._protocol import (
    BackendOptions,
    Cancelled,
    Capabilities,
    Group,
    LaneState,
    Task,
)
from ._bundling import bundled
from ._crew import Crew
from ._cwd import DeletedCwdOs, with_absolute_pythonpath
from ._delivery import notify, starts
from ._lanes import Lane
from ._limits import Limits, wait_seconds
from ._mailbox import Mailbox
from ._poller import Poller
from ._record import SharedRecord, lane_state
from ._returns import Returns

__all__ = ["LocalBackend"]

CAPABILITIES = Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                            kills_running=True, shared_memory=True, memory_limits=True,
                            processes=True, serializes=True, cuts_chunks=True)

# How long shutdown(cancel_pending=True) waits for the pool thread to start idle workers before
# cancelling the rest itself: one turn of the loop, unless it is respawning a worker (seconds).
CANCEL_TURN_TIMEOUT = 10.0
DATA_LIMIT_HEADROOM = 512 * 1024 * 1024
# The RSS cap mem_per_task implies when max_rss_per_worker is not given (the memory limit is
# then 2 x this + the headroom): generous, since mem_per_task is an estimate that sizes the
# pool, yet a bound on the item that needs ten times what was planned.
MEM_PER_TASK_CAP = 2
# How long worker_pids() waits for the first workers to be started (not ready: started).
STARTUP_WAIT = 60.0


def _loky_context() -> Any:
    """loky's fork+exec context, imported only when a worker is started without the template;
    it starts workers even after the working directory was deleted (see ``_cwd``)."""
    from loky.backend import spawn
    from loky.backend.context import get_context

    if not isinstance(spawn.os, DeletedCwdOs):
        spawn.os = DeletedCwdOs()
    return get_context("loky")


def _worker_setup(options: BackendOptions, record_path: str,
                  published: _shared.Published | None) -> WorkerSetup:
    """What every worker gets (the crew fills in its slot and parent). With the engine's shared
    values or its initializer published in shared memory, the worker maps them from there."""
    booted = published is not None and published.boot is not None
    return WorkerSetup(record_path, -1, os.getpid(),
                       None if booted else options.initializer,
                       () if booted else tuple(options.initargs), data_limit_of(options),
                       options.shm_threshold, options.writable_inputs,
                       shared=published.shared if published is not None else None,
                       boot=published.boot if published is not None else None)


def _closed_error(failure: BaseException | None) -> EngineClosed:
    if failure is None:
        return EngineClosed("this engine has been shut down; create a new Engine")
    error = EngineClosed(
        f"this engine stopped serving: its pool thread failed with {type(failure).__name__}: "
        f"{failure} (a stagepool bug: please report it); create a new Engine")
    error.__cause__ = failure
    return error


class LocalBackend:
    """A fixed number of worker processes, each fed through its own pipe by one pool thread."""

    def __init__(self, options: BackendOptions, *, kill_grace: float = 0.5) -> None:
        self._workers = workers = options.workers
        self._pid = os.getpid()  # the workers' parent: a forked child must leave them alone
        self._codec = SharedMemoryCodec(options.shm_threshold,
                                        read_only_inputs=not options.writable_inputs)
        _shm.sweep_stale()  # shared memory of engines whose process died without cleanup
        self._published = _publish(options, self._pid)
        self._record = SharedRecord(4 * (workers + 1))
        self._limits = Limits(self._record, options.init_timeout, options.max_rss)
        self._queue = FairShare()
        self._lock = self._queue.lock
        self._closed = False
        self._failure: BaseException | None = None  # why the pool thread stopped on its own
        self._stopping = False
        self._kill_all = False
        self._mailbox = Mailbox()
        self._poller = Poller()
        setup = _worker_setup(options, self._record.path, self._published)
        self._crew = Crew(_loky_context, self._record, setup, with_absolute_pythonpath(options.env),
                          options.max_tasks, kill_grace, workers, options.preload,
                          template=options.template)
        self._returns = Returns(self._crew, self._queue, self._retire, max_rss=options.max_rss,
                                max_tasks=options.max_tasks, initializer=options.initializer)
        self._started = threading.Event()  # the first workers are up (the pool thread starts them)
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
            raise _closed_error(self._failure)

    def submit_many(self, tasks: list[Task]) -> None:
        """Queue tasks with one lock and one wake-up of the pool thread: each wake-up costs a GIL
        hand-off, which on a busy 2-core machine is a scheduling delay of up to a millisecond."""
        with self._lock:
            if self._closed:
                raise _closed_error(self._failure)
            refused = [task for task in tasks if not self._queue.queue_locked(task)]
        if len(refused) < len(tasks):
            self._mailbox.wake()
        for task in refused:
            notify(task, Cancelled("batch cancelled"))

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Never blocks and takes no lock: it may run in a garbage collector's finalizer (an
        abandoned imap generator closing) in the middle of any thread, the pool thread included,
        holding any lock. The flag stops dispatch at once; the pool thread does the rest."""
        group.cancelled = True
        self._mailbox.post(lambda: self._withdraw_now(group, kill_running))

    def withdraw_task(self, task: Task) -> None:
        """One task out of its group's queue, if still queued. Lock-free, like withdraw()."""
        self._mailbox.post(lambda: self._withdraw_task_now(task))

    def _withdraw_task_now(self, task: Task) -> None:
        if self._queue.withdraw_task(task):
            notify(task, Cancelled("future cancelled"))

    def _withdraw_now(self, group: Group, kill_running: bool) -> None:
        for task in self._queue.withdraw(group):
            notify(task, Cancelled("batch cancelled"))
        if kill_running:
            self._crew.kill_running(group, replace=not self._kill_all)

    def worker_pids(self) -> list[int]:
        self._started.wait(STARTUP_WAIT)
        with self._lock:
            return [lane.pid for lane in self._crew.lanes]

    def spare_pid(self) -> int | None:
        """The pid of the spare worker kept ready (see ``_spare``), if there is one now."""
        with self._lock:
            spare = self._crew.spare.lane
            return None if spare is None else spare.pid

    def lane_states(self) -> list[LaneState]:
        with self._lock:
            lanes = [(lane.pid, lane.slot, bool(lane.tasks)) for lane in self._crew.lanes]
        return [lane_state(self._record, pid, slot, busy) for pid, slot, busy in lanes]

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
        self._mailbox.wake()
        if wait and threading.current_thread() is not self._thread:
            try:
                self._thread.join()
            except BaseException:  # Ctrl-C while waiting for a hung item: kill it, then go
                with self._lock:
                    self._kill_all = True
                self._mailbox.wake()
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

            self._mailbox.post(start_then_cancel)
            deadline = time.monotonic() + CANCEL_TURN_TIMEOUT
            while self._thread.is_alive() and time.monotonic() < deadline:  # it may stop first
                if turn.wait(0.05):
                    return
        for task in self._queue.drain():
            notify(task, Cancelled("the engine was shut down"))

    # ---- the pool thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            try:  # here, not in the constructor: Engine() returns while the workers start
                self._crew.start(self._workers)
            finally:
                self._started.set()
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
        by_obj: dict[Any, tuple[str, Lane | None]] = {self._mailbox.fd: ("wake", None)}
        by_obj.update(self._crew.watch())
        wake = self._limits.next_wake(self._crew.lanes, self._crew.leaving.values())
        ready = self._poller.wait(by_obj, wait_seconds(wake, time.monotonic()))
        for obj in ready:
            what, owner = by_obj[obj]
            if what == "wake":
                self._mailbox.drain()
            elif owner is None:
                continue
            elif owner in self._crew.leaving:
                if what == "left":
                    self._crew.reap(owner)
                else:
                    owner.forward_stderr()
            elif owner is self._crew.spare.lane:
                self._crew.spare.event(what)
            elif owner not in self._crew.lanes:
                continue
            elif what == "stderr":
                owner.forward_stderr()
            elif what == "result":
                self._returns.receive(owner, respawn=not self._kill_all)
            else:
                self._returns.bury(owner, respawn=not self._kill_all)
        self._crew.expire_leaving()
        self._mailbox.run_calls()
        for lane, reason, offset in self._limits.broken(list(self._crew.lanes)):
            self._crew.kill(lane, reason, offset,
                            replace=reason != "init_timeout" and not self._kill_all)
        if self._kill_all:
            self._crew.kill_everything()
        self._dispatch()
        # No spare once the initializer killed a worker: a spare runs the initializer too, and
        # would die the same way (a respawn loop by another name).
        self._crew.keep_spare(stopping=self._stopping or self._kill_all
                              or self._returns.init_died is not None)
        return self._maybe_stop()

    def _retire(self, lane: Lane) -> None:
        # Stopping gracefully still owes the queued tasks a worker: without a replacement,
        # max_tasks_per_worker=1 and shutdown(wait=True) hung forever (CPython gh-115634).
        self._crew.retire(lane, replace=not self._stopping or bool(self._queue and not self._kill_all))

    # ---- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._returns.init_died is not None:
            for waiting in self._queue.drain():
                notify(waiting, self._returns.init_died)
            return
        for prefetch in (False, True):  # fill idle workers first, then prefetch onto busy ones
            for lane in list(self._crew.lanes):
                if bool(lane.tasks) != prefetch:
                    continue
                task = self._queue.take(lane.can_take)
                if task is None and not prefetch and self._queue and lane.used_up():
                    lane.retiring = True  # less of max_tasks_per_worker left than a task holds
                    self._retire(lane)
                if task is None or not starts(task):
                    continue
                if task.timeouts is not None:  # a kill may follow: have its replacement ready
                    self._crew.spare.wanted = True
                quota = None if lane.quota is None else lane.quota - sum(
                    t.n_items for t in lane.tasks)
                lane.send(bundled(self._queue, task, len(self._crew.lanes), quota))

    # ---- stopping ----------------------------------------------------------------------------

    def _maybe_stop(self) -> bool:
        with self._lock:
            if not self._stopping or (self._queue and not self._kill_all):
                return False
        if any(lane.tasks for lane in self._crew.lanes):
            return False
        for lane in list(self._crew.lanes):  # all told at once: they exit side by side
            self._retire(lane)
        return not self._crew.leaving

    def _close_everything(self) -> None:
        ended = Cancelled("the engine was shut down") if self._failure is None else Cancelled(
            f"the engine's pool thread failed ({type(self._failure).__name__}: {self._failure})",
            self._failure)
        for task in self._crew.close():
            notify(task, ended)
        for task in self._queue.drain():
            notify(task, ended)
        self._mailbox.close()
        self._record.close()
        if self._published is not None:  # after the workers: a respawn may still have read them
            _shared.withdraw(self._published, owner=self._pid)
        _live_backends.discard(self)


def data_limit_of(options: BackendOptions) -> int | None:
    """A worker's RLIMIT_DATA: private writable memory may reach twice the RSS cap (plus room for
    the interpreter and BLAS buffers) before an allocation fails with MemoryError inside the
    item. Without a cap, ``mem_per_task`` gives one (MEM_PER_TASK_CAP of it): a task sized at
    1 GiB that meets a 6 GiB item fails alone instead of waking the OOM killer."""
    cap = options.max_rss
    if cap is None and options.mem_per_task is not None:
        cap = MEM_PER_TASK_CAP * options.mem_per_task
    return None if cap is None else 2 * cap + DATA_LIMIT_HEADROOM


def _publish(options: BackendOptions, owner: int) -> _shared.Published | None:
    """Shared values and (initializer, initargs) into /dev/shm, so that a worker's start-up
    arguments stay small (see _shared); None where there is no /dev/shm: they then go through the
    start pipe (shared values as the initializer's do, which may block while a worker starts)."""
    if not _shm.available():
        if options.shared:
            raise ValueError("shared= needs /dev/shm, which this machine does not offer")
        return None
    return _shared.publish(options.shared, options.initializer, tuple(options.initargs),
                           owner=owner)


_live_backends: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


def _disown_after_fork() -> None:
    """In a child forked from the caller: its copies of the engines have no pool thread and the
    workers are not its children. Forget them, so that its exit neither shuts them down nor has
    multiprocessing join them ("can only join a child process")."""
    children: set[Any] = getattr(multiprocessing.process, "_children", set())
    for backend in list(_live_backends):
        for lane in [*backend._crew.lanes, *backend._crew.leaving]:
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
