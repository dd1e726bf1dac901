"""The dask backend: chunks run on a dask.distributed cluster, one dask task per chunk. The only
module that imports ``distributed``, and only when ``backend="dask"`` is asked for: importing it
takes a noticeable fraction of a second and registers ~185 exception reducers in
``copyreg.dispatch_table``, which every pickler that copies that table pays for on each message
(ours do not copy it: with distributed imported, the local codec's pickling measured the same).

    Engine thread(s) --submit(Task)--> FairShare queue
                                          |
                  [dispatcher thread] --client.submit(_run_chunk, pinned to a worker with a free
                          |              thread; big payloads scattered to it first)
                          |                                      |
                          |              dask worker: _run_chunk -> this engine's _HostPlugin
                          |                 -> a hosted LocalBackend (one lane per worker thread)
                          |                 -> lane process: _worker.run_chunk, the shared record
                          |  <--answer bytes | LaneDied (exact item, address) | Cancelled------/
                          |  <--the dask worker left (died, killed, retired): LaneDied(offset -1)
                  Task.on_done(result | LaneDied | Cancelled)

Why a backend hosted inside each dask worker (a WorkerPlugin per engine) and not the item run in
the dask worker's own thread: everything the local backend guarantees comes with it, from code
we already trust. An item that segfaults kills a lane, not the dask worker (whose death would
fail every chunk it ran, and which dask would then count against the task); the shared record
names the exact item; a timeout kills the lane's whole process tree (dask has no way to stop a
running task); memory caps and initializers work per lane. The dask worker never unpickles
anything of the caller's: items travel as the opaque bytes of our codec, so an argument whose
unpickling crashes or imports heavy modules does so in a lane. What remains dask's is placement,
transport and the cluster's membership.

Faults, and why no item is blamed twice or wrongly:

* A worker runs at most as many of our chunks as it has threads: each chunk is pinned to a
  worker with a free thread (``workers=[address]``, ``allow_other_workers=False``), the rest wait
  in our queue. So every chunk on a worker that dies was running there, never merely queued.
* Dask itself never re-runs our tasks elsewhere (``retries=0``; a pinned task cannot move) and
  never decides a verdict for us: the dispatcher polls the cluster's membership and answers each
  chunk of a worker that left with ``LaneDied(offset=-1)``, exactly once (a ``KilledWorker`` that
  arrives later is ignored). The batch then runs the chunk again in halves until the guilty item
  is alone, so a worker killed by an item (or by anyone) fails at most the one item it was running.
  The in-process cluster also sets ``allowed-failures`` to 0, so dask reports such a death at once.
* Cancelling a batch withdraws its queued chunks (they never became dask tasks); its running
  ones finish and their answers are dropped, as locally, unless ``kill_running``: then their dask
  futures are cancelled and the worker side, which watches its task's state while it waits,
  kills the lanes running them. A client that disconnects gets the same from the scheduler.

Big numpy arrays: no shared memory here (the workers may be on other machines). A payload is the
codec's pickle viewed as a ``uint8`` array, which dask sends as an out-of-band pickle-5 buffer (no
copy into a message); payloads over ``SCATTER_BYTES`` are scattered straight to the chosen worker
rather than riding in the task graph through the scheduler. Arrays inside that pickle are in-band
(a memcpy at each end, about a millisecond per 8 MiB, small beside the network): the price of a
dask worker that never unpickles the caller's data. Results come back the same way.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import os
import queue
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import dask
import distributed
import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from .._errors import EngineClosed
from .._planning import plan_workers
from ._codec import SharedMemoryCodec
from ._fairshare import FairShare
from ._protocol import (
    Backend,
    BackendOptions,
    Cancelled,
    Capabilities,
    Encoded,
    Group,
    LaneDied,
    Task,
    TaskResult,
)

__all__ = ["CAPABILITIES", "DaskBackend", "PickleCodec"]

CAPABILITIES = Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                            kills_running=True, shared_memory=False, memory_limits=True,
                            processes=True, serializes=True, fast_round_trip=False,
                            chunk_seconds=0.2)

# How often the dispatcher asks the scheduler which workers there are while chunks are running or
# queued: how long a dead worker's chunks wait before they run again. One small RPC each time.
MEMBERSHIP_POLL = 0.5
# How often a waiting chunk on a worker looks at its dask task's state (cancelled: kill it).
CANCEL_POLL = 0.1
# Payloads above this go to their worker with ``client.scatter`` (directly, one hop) instead of in
# the task graph, which the scheduler receives, holds and forwards (dask warns past 10 MB).
SCATTER_BYTES = 1 << 20
# The bound on connecting to the scheduler and on the calls that take one (the membership poll, a
# scatter, fetching a result).
RPC_TIMEOUT = 30.0
# Connecting again only to clean up after a client closed under the engine: not for long.
CLEANUP_TIMEOUT = 5.0
# An engine on a cluster with no worker yet waits this long for one, then says so.
FIRST_WORKER_TIMEOUT = 30.0


SHUT_DOWN = Cancelled("the engine was shut down")


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


# ---- the worker side: a backend hosted in each dask worker ----------------------------------


class _HostPlugin(WorkerPlugin):
    """One engine's presence on a dask worker: a hosted backend with one lane per worker thread.

    Registered by the engine under its own name, so engines sharing a cluster never share lanes,
    initializers or function keys; removed (and its lanes killed) when the engine shuts down.
    """

    def __init__(self, name: str, options: BackendOptions,
                 hosted: Callable[[BackendOptions], Backend]) -> None:
        self.name = name
        self.options, self.hosted = options, hosted
        self.backend: Backend | None = None
        self.worker: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_HostPlugin, (self.name, self.options, self.hosted))  # never a live backend

    def setup(self, worker: Any) -> None:
        # Dask starts worker processes as daemons, and a daemonic process may not start children.
        # The flag exists so that children cannot outlive their parent; our lanes watch their
        # parent and exit within 0.25 s of its death (see _worker._watch_parent), so lifting it
        # keeps that promise.
        multiprocessing.current_process().daemon = False
        self.worker = worker
        threads = worker.state.nthreads
        # The worker's own environment decides BLAS threads (dask's nanny sets 1 per worker);
        # unset variables get this host's CPUs // threads.
        env = {**plan_workers().thread_env(workers=threads), **self.options.env}
        self.backend = self.hosted(dataclasses.replace(self.options, workers=threads, env=env,
                                                       shm_threshold=0))

    async def teardown(self, worker: Any) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:  # in a thread: killing and joining must not stall the worker
            await asyncio.to_thread(backend.shutdown, wait=True, cancel_pending=True, kill=True)

    def run(self, key: str, fn_key: int, fn: bytes, items: Any, n_items: int,
            timeouts: tuple[float, ...] | None, per_item_clock: bool) -> TaskResult:
        """Run one chunk on this worker's lanes and return their answer; kill the chunk if its
        dask task is cancelled meanwhile (the engine's kill, or its client gone)."""
        backend = self.backend
        answers: queue.SimpleQueue[TaskResult] = queue.SimpleQueue()
        task = Task(Group(), fn_key, fn, memoryview(items), n_items,
                    lambda _task, answer: answers.put(answer), timeouts,
                    per_item_clock=per_item_clock)
        if backend is None:  # torn down: the engine is shutting down
            return SHUT_DOWN
        try:
            backend.submit_many([task])
        except EngineClosed:
            return SHUT_DOWN
        while True:
            try:
                return self._reply(answers.get(timeout=CANCEL_POLL))
            except queue.Empty:
                if not task.group.cancelled and self._abandoned(key):
                    backend.withdraw(task.group, kill_running=True)

    def _abandoned(self, key: str) -> bool:
        """Whether dask gave up on our task (the engine cancelled it, or its client is gone)."""
        state = self.worker.state.tasks.get(key)  # a dict read: safe from this thread
        return state is None or state.state in ("cancelled", "released", "forgotten")

    def _reply(self, answer: TaskResult) -> TaskResult:
        if isinstance(answer, LaneDied):
            return dataclasses.replace(answer, where=f"dask worker {self.worker.address}")
        if isinstance(answer, Cancelled):
            return answer
        return np.frombuffer(answer, dtype=np.uint8)  # sent out-of-band, like the inputs


def _run_chunk(name: str, key: str, *chunk: Any) -> TaskResult:
    """The dask task of one chunk: runs in a dask worker's thread, which waits while this
    engine's lanes on that worker run the items (``chunk``: see ``_HostPlugin.run``)."""
    worker = distributed.get_worker()
    host = worker.plugins.get(name)
    if not isinstance(host, _HostPlugin):
        return LaneDied(os.getpid(), None, -1, "crash",
                        f"stagepool is not set up on this dask worker (plugin {name} missing)",
                        where=f"dask worker {worker.address}")
    return host.run(key, *chunk)


def _lane_pids(name: str, dask_worker: Any) -> list[int]:
    """Run by ``client.run`` on each worker: the pids of this engine's lanes there."""
    host = dask_worker.plugins.get(name)
    backend = host.backend if isinstance(host, _HostPlugin) else None
    return backend.worker_pids() if backend is not None else []


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
        self._cluster, self._client = _connect(options.workers, address, client)
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
            self._client.register_plugin(_HostPlugin(self._name, options, hosted), name=self._name)
            self._await_first_worker()
        except BaseException:
            self._close()
            raise
        self._thread.start()
        _live_backends.add(self)

    def _await_first_worker(self) -> None:
        self._refresh_workers()
        if self._workers:
            return
        try:
            self._client.wait_for_workers(1, timeout=FIRST_WORKER_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"the dask cluster at {self._address} has no worker after "
                f"{FIRST_WORKER_TIMEOUT:g} s; start some with: dask worker {self._address}"
            ) from None
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

    def worker_pids(self) -> list[int]:
        """The lanes' pids on every worker (on their hosts: a remote pid names a remote process)."""
        if self._closed:
            return []
        try:
            per_worker = self._client.run(_lane_pids, self._name, on_error="return")
        except Exception:  # the client is closing
            return []
        return sorted(pid for pids in per_worker.values() if isinstance(pids, list) for pid in pids)

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
        payload: Any = task.items
        data = None
        try:
            if payload.nbytes > SCATTER_BYTES:
                payload = data = self._client.scatter(payload, workers=[worker.address], hash=False,
                                                      timeout=RPC_TIMEOUT)
            future = self._client.submit(
                _run_chunk, self._name, key, task.fn_key, task.fn, payload, task.n_items,
                task.timeouts, task.per_item_clock, key=key, workers=[worker.address],
                allow_other_workers=False, pure=False, retries=0)
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
            self._unregister()
        if self._own_client:
            with contextlib.suppress(Exception):
                self._client.close(timeout=RPC_TIMEOUT)
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close(timeout=RPC_TIMEOUT)


    def _unregister(self) -> None:
        """Remove our plugin from the workers, which kill our lanes there; through a client of
        our own if the engine's was closed under it (else the lanes would idle on a shared
        cluster until its workers exit)."""
        client = self._client
        if client.status not in ("closing", "closed"):
            client.unregister_worker_plugin(self._name)
            return
        with distributed.Client(  # type: ignore[no-untyped-call]
                self._address, security=client.security, timeout=CLEANUP_TIMEOUT,
                set_as_default=False) as fresh:
            fresh.unregister_worker_plugin(self._name)


def _connect(workers: int, address: str | None, client: Any) -> tuple[Any, Any]:
    """(the cluster we started or None, the client to use)."""
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"backend must be 'local', 'serial', 'dask' or a distributed.Client, "
                            f"not {type(client).__name__}")
        return None, client
    if address is not None:
        try:
            return None, distributed.Client(  # type: ignore[no-untyped-call]
                address, timeout=RPC_TIMEOUT, set_as_default=False)
        except OSError as exc:
            raise OSError(f"cannot reach the dask scheduler at {address}: {exc}") from exc
    # Our own cluster: dask must never re-run a task whose worker died (we decide what a death
    # means), and the cluster listens on this machine only.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0")  # no fixed port to collide on
    try:
        return cluster, distributed.Client(  # type: ignore[no-untyped-call]
            cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise


_live_backends: weakref.WeakSet[DaskBackend] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """An engine left open at exit: kill its lanes and close its cluster before dask's own exit
    handlers tear the client down under it."""
    for backend in list(_live_backends):
        backend.shutdown(wait=True, cancel_pending=True, kill=True)
