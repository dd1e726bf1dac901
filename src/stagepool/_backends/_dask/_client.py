"""The client side of the dask backend: ``DaskBackend`` and its dispatcher thread, which queues
chunks fairly, pins each to a dask worker with a free thread, follows the cluster's membership and
turns dask's answers into task results (see the package docstring for the faults it handles)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import queue
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..._errors import EngineClosed
from .._codec import SharedMemoryCodec
from .._fairshare import FairShare
from .._protocol import (
    Backend,
    BackendOptions,
    Cancelled,
    Capabilities,
    Encoded,
    Group,
    LaneDied,
    LaneState,
    Task,
    TaskResult,
)
from . import _cluster
from ._cluster import RPC_TIMEOUT
from ._plugin import SHUT_DOWN, HostPlugin

__all__ = ["CAPABILITIES", "DaskBackend", "PickleCodec"]

CAPABILITIES = Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                            kills_running=True, shared_memory=False, memory_limits=True,
                            processes=True, serializes=True, fast_round_trip=False,
                            chunk_seconds=0.2)

# How often the dispatcher asks the scheduler which workers there are while chunks are running or
# queued: how long a dead worker's chunks wait before they run again. One small RPC each time.
MEMBERSHIP_POLL = 0.5


# ---- the codec --------------------------------------------------------------------------------


class PickleCodec(SharedMemoryCodec):
    """The local codec without shared memory, its bytes shaped for dask's transport.

    A payload is the pickle as a read-only ``uint8`` array: dask serializes numpy arrays as
    out-of-band pickle-5 buffers, so the bytes go to the socket without a copy into a message.
    """

    def __init__(self) -> None:
        super().__init__(threshold=0)

    def encode(self, items: list[Any], arena: int | None) -> Encoded:
        encoded = super().encode(items, None)
        return Encoded(np.frombuffer(encoded.payload, dtype=np.uint8), encoded.nbytes)

    def decode(self, result: Any) -> Any:
        return super().decode(memoryview(result))

    def release(self, items: Any, arena: int | None) -> None:
        pass  # nothing is in shared memory

    def drop(self, result: Any) -> None:
        pass



# ---- the client side ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Worker:
    """A dask worker as the dispatcher sees it: its threads, and how many run our chunks."""

    address: str
    threads: int
    pid: int
    busy: int = 0


@dataclasses.dataclass(eq=False, slots=True)
class _Running:
    task: Task
    worker: _Worker
    future: Any  # distributed.Future
    data: Any = None  # the scattered payload's future: held until the chunk answers
    sent: float = dataclasses.field(default_factory=time.monotonic)  # for lane_states()


class _Done(NamedTuple):
    """A dask future finished (from dask's callback thread, which also fetched its result)."""

    key: str
    result: TaskResult
    error: str | None  # the task failed: why, as dask told it


class _Call(NamedTuple):
    """Work for the dispatcher thread (a withdraw, a shutdown): lock-free to send."""

    fn: Callable[[], None]


def _notify(task: Task, result: TaskResult) -> None:
    """Deliver a result; a faulty callback must never take the dispatcher down with it."""
    try:
        task.on_done(task, result)
    except Exception:  # pragma: no cover - a bug in a callback, reported, not fatal
        traceback.print_exc()


def _on_future_done(inbox: queue.SimpleQueue[_Done | _Call | None], key: str, future: Any) -> None:
    """In dask's callback thread: fetch the answer here, so the dispatcher never waits for bytes
    to cross the network."""
    try:
        if future.status == "finished":
            inbox.put(_Done(key, future.result(timeout=RPC_TIMEOUT), None))
        elif future.status == "error":
            exc = future.exception(timeout=RPC_TIMEOUT)
            inbox.put(_Done(key, None, f"{type(exc).__name__}: {exc}"))
        else:
            inbox.put(_Done(key, None, f"dask reports the task {future.status}"))
    except BaseException as exc:  # lost with its worker, or the client is closing
        inbox.put(_Done(key, None, f"{type(exc).__name__}: {exc}"))

class DaskBackend:
    """Runs chunks on a dask cluster: an in-process ``LocalCluster``, one at ``address``, or the
    cluster of an existing ``client`` (never closed here)."""

    def __init__(self, options: BackendOptions, *, hosted: Callable[[BackendOptions], Backend],
                 address: str | None = None, client: Any = None) -> None:
        self._cluster, self._client = _cluster.connect(options.workers, address, client)
        self._own_client = client is None
        self._address: str = self._client.scheduler.address  # gone from a closed client
        self._name = f"stagepool-{uuid.uuid4().hex[:12]}"
        self._codec = PickleCodec()
        self._queue = FairShare()
        self._lock = self._queue.lock
        self._workers: dict[str, _Worker] = {}
        self._running: dict[str, _Running] = {}
        self._inbox: queue.SimpleQueue[_Done | _Call | None] = queue.SimpleQueue()
        self._keys = itertools.count()
        self._closed = self._stopping = False
        self._closed_why = "this engine has been shut down; create a new Engine"
        self._polled = 0.0
        self._thread = threading.Thread(target=self._run, name="stagepool-dask", daemon=True)
        try:
            self._client.register_plugin(HostPlugin(self._name, options, hosted), name=self._name)
            self._await_first_worker()
        except BaseException:
            self._close()
            raise
        self._thread.start()
        _live_backends.add(self)

    def _await_first_worker(self) -> None:
        self._refresh_workers()
        if not self._workers:
            _cluster.wait_for_first_worker(self._client, self._address)
            self._refresh_workers()

    def __str__(self) -> str:
        workers = list(self._workers.values())
        threads = {w.threads for w in workers}
        shape = (f"{len(workers)} workers x {threads.pop()} thread" if len(threads) == 1
                 else f"{len(workers)} workers")
        own = "in-process LocalCluster" if self._cluster is not None else "dask cluster"
        return f"{own} at {self._address}, {shape}"

    # ---- the Backend protocol ---------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The cluster's threads now (each runs one chunk at a time)."""
        return max(1, sum(w.threads for w in list(self._workers.values())))

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    @property
    def codec(self) -> PickleCodec:
        return self._codec

    def check_open(self) -> None:
        if self._closed:
            raise EngineClosed(self._closed_why)

    def submit_many(self, tasks: list[Task]) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosed(self._closed_why)
            refused = [task for task in tasks if not self._queue.queue_locked(task)]
        self._inbox.put(None)  # wake the dispatcher
        for task in refused:
            _notify(task, Cancelled("batch cancelled"))

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Never blocks and takes no lock (it may run in a garbage collector's finalizer):
        SimpleQueue.put is re-entrant; the dispatcher does the rest."""
        group.cancelled = True
        self._inbox.put(_Call(functools.partial(self._withdraw_now, group, kill_running)))

    def withdraw_task(self, task: Task) -> None:
        self._inbox.put(_Call(functools.partial(self._withdraw_task_now, task)))

    def lane_states(self) -> list[LaneState]:
        """Per worker thread: busy on a chunk since it was sent (the item inside it is not
        known here: the lanes that run it are on the worker's host), or idle."""
        running = list(self._running.values())
        busy = [LaneState(r.worker.address, r.task.id, -1, r.sent) for r in running]
        idle = [LaneState(w.address, 0, -1, None) for w in list(self._workers.values())
                for _ in range(max(0, w.threads - w.busy))]
        return busy + idle

    def worker_pids(self) -> list[int]:
        """The lanes' pids on every worker (on their hosts: a remote pid names a remote process)."""
        return [] if self._closed else _cluster.worker_lane_pids(self._client, self._name)

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        with self._lock:
            self._closed = True
        for task in self._queue.drain() if cancel_pending else ():
            _notify(task, SHUT_DOWN)
        self._inbox.put(_Call(functools.partial(self._stop, kill)))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- the dispatcher thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self._stopping and not self._running and not self._queue):
                self._step()
        finally:
            self._close()

    def _step(self) -> None:
        busy = bool(self._running or self._queue)
        try:
            message = self._inbox.get(timeout=MEMBERSHIP_POLL if busy else None)
        except queue.Empty:
            message = None
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
        if self._client.status in ("closing", "closed") and not self._stopping:
            self._client_gone()
        if (self._running or self._queue) and time.monotonic() - self._polled >= MEMBERSHIP_POLL:
            self._refresh_workers()
        self._dispatch()

    def _handle(self, message: _Done | _Call | None) -> None:
        if isinstance(message, _Done):
            self._finish(message)
        elif isinstance(message, _Call):
            message.fn()

    def _refresh_workers(self) -> None:
        """Follow the cluster: workers that joined get chunks, chunks of workers that left fail."""
        self._polled = time.monotonic()
        try:
            threads: dict[str, int] = self._client.nthreads(callback_timeout=RPC_TIMEOUT)
        except Exception:  # the scheduler is unreachable for now: look again next turn
            return
        for address in [a for a in self._workers if a not in threads]:
            self._lose(self._workers.pop(address))
        joined = [a for a in threads if a not in self._workers]
        if joined:
            info = self._client.scheduler_info()["workers"]
            for address in joined:
                pid = int(info.get(address, {}).get("pid") or 0)
                self._workers[address] = _Worker(address, int(threads[address]), pid)

    def _lose(self, worker: _Worker) -> None:
        """A worker left while running chunks: each fails as "died on an unknown item"."""
        lost = [(k, run) for k, run in self._running.items() if run.worker is worker]
        for key, run in lost:
            del self._running[key]
            _notify(run.task, LaneDied(
                worker.pid, None, -1, "crash",
                "the dask worker left the cluster while running this chunk (killed, crashed or "
                "disconnected)", where=f"dask worker {worker.address}"))
        self._cancel_futures([run for _key, run in lost])

    def _dispatch(self) -> None:
        while True:
            worker = max(self._workers.values(), key=lambda w: w.threads - w.busy, default=None)
            if worker is None or worker.busy >= worker.threads:
                return
            task = self._queue.take(lambda _task: True)
            if task is None:
                return
            if task.on_start is not None and not task.on_start(task):
                _notify(task, Cancelled("future cancelled"))
                continue
            if not self._send(worker, task):
                return

    def _send(self, worker: _Worker, task: Task) -> bool:
        """Submit one chunk pinned to ``worker``; False (the task queued again) if dask refused."""
        key = f"{self._name}-{next(self._keys)}"
        try:
            future, data = _cluster.submit_chunk(self._client, self._name, key, worker.address, task)
            future.add_done_callback(functools.partial(_on_future_done, self._inbox, key))
        except Exception:  # the worker just left, or the client is closing: look again first
            for refused in self._queue.queue([task], front=True):
                _notify(refused, Cancelled("batch cancelled"))
            self._polled = 0.0
            return False
        worker.busy += 1
        self._running[key] = _Running(task, worker, future, data)
        return True

    def _finish(self, done: _Done) -> None:
        run = self._running.pop(done.key, None)
        if run is None:  # answered already: its worker left, or it was killed
            return
        run.worker.busy -= 1
        if done.error is None:
            _notify(run.task, done.result)
            return
        _notify(run.task, LaneDied(run.worker.pid, None, -1, "crash", done.error,
                                   where=f"dask worker {run.worker.address}"))

    def _withdraw_now(self, group: Group, kill_running: bool) -> None:
        for task in self._queue.withdraw(group):
            _notify(task, Cancelled("batch cancelled"))
        if kill_running:
            self._kill([k for k, run in self._running.items() if run.task.group is group],
                       "batch cancelled")

    def _withdraw_task_now(self, task: Task) -> None:
        if self._queue.withdraw_task(task):
            _notify(task, Cancelled("future cancelled"))

    def _kill(self, keys: list[str], reason: str) -> None:
        """Cancel running chunks: each worker side sees its task cancelled and kills its lanes."""
        runs = [self._running.pop(key) for key in keys]
        for run in runs:
            run.worker.busy -= 1
            _notify(run.task, Cancelled(reason))
        self._cancel_futures(runs)

    def _cancel_futures(self, runs: list[_Running]) -> None:
        if runs:
            with contextlib.suppress(Exception):  # the client is closing: nothing left to cancel
                self._client.cancel([run.future for run in runs])

    def _client_gone(self) -> None:
        """The client was closed under us (``Engine(backend=client)``): nothing can run again."""
        with self._lock:
            self._closed = True
            self._closed_why = "the dask client of this engine was closed; create a new Engine"
        gone = Cancelled("the dask client was closed")
        for task in self._queue.drain():
            _notify(task, gone)
        self._kill(list(self._running), gone.reason)
        self._stopping = True

    def _stop(self, kill: bool) -> None:
        self._stopping = True
        if kill:
            self._kill(list(self._running), "the engine was shut down")

    def _close(self) -> None:
        """Remove this engine from the workers (their lanes are killed), then close what we
        opened. Every step is bounded and a failure skips to the next: nothing may hang here."""
        _live_backends.discard(self)
        for run in self._running.values():
            _notify(run.task, SHUT_DOWN)
        self._running.clear()
        for task in self._queue.drain():
            _notify(task, SHUT_DOWN)
        with contextlib.suppress(Exception):
            _cluster.unregister(self._client, self._address, self._name)
        if self._own_client:
            with contextlib.suppress(Exception):
                self._client.close(timeout=RPC_TIMEOUT)
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close(timeout=RPC_TIMEOUT)


_live_backends: weakref.WeakSet[DaskBackend] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """An engine left open at exit: kill its lanes and close its cluster before dask's own exit
    handlers tear the client down under it."""
    for backend in list(_live_backends):
        backend.shutdown(wait=True, cancel_pending=True, kill=True)
