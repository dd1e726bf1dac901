"""The client side of the dask backend: ``DaskBackend`` and its dispatcher thread, which queues
chunks fairly, pins each to a dask worker with a free thread, follows the cluster's membership and
turns dask's answers into task results (see the package docstring for the faults it handles)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..._errors import EngineClosed
from ..._worker import decoded_result
from .._codec import SharedMemoryCodec
from .._fairshare import FairShare
from .._protocol import (
    Backend,
    BackendOptions,
    Cancelled,
    Capabilities,
    Encoded,
    Group,
    LaneState,
    Task,
)
from . import _cluster, _frames
from ._cluster import RPC_TIMEOUT
from ._flights import Call, Done, Flights, Freed, Inbox, notify
from ._owner import owner
from ._plugin import SHUT_DOWN, HostPlugin
from ._roster import Roster
from ._versions import LOGGER

__all__ = ["CAPABILITIES", "DaskBackend", "PickleCodec"]

# chunk_seconds: a chunk costs ~18 ms of CPU in dask's machinery (client, scheduler, worker:
# measured on 2 loaded cores), and on a small cluster those cores are the lanes' too. At 0.2 s
# a CPU contention that stretches 20 ms items to 200 ms cut single-item chunks (200 chunks for
# 200 items, as much dask CPU as item CPU); 0.5 s sent 74-91 and ran the cpu workload at 1.01x
# the local engine's speed in the same process (0.2 s: 0.62x; load 19-25, rough). The cost:
# coarser balance, which the tail shares (see _chunking) keep to the last chunks.
# chunk_bytes: the local bound (4 MiB) made each 4 MiB array its own dask task at ~18 ms each:
# 64 x 4 MiB through ``a + 1`` ran at 0.49x client.map's speed. A chunk of 64 MiB moves in tens
# of milliseconds, as its frames go uncopied (see benchmarks/dask_arrays.py for the figures). The
# cost: a worker host's /dev/shm holds a running chunk's arrays and results (2 x 64 MiB), more
# than a container's default of 64 MiB: such a chunk then goes through the pipe (_frames.NoRoom).
CHUNK_BYTES = 64 << 20
CAPABILITIES = Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                            kills_running=True, shared_memory=False, memory_limits=True,
                            processes=True, serializes=True, fast_round_trip=False,
                            chunk_seconds=0.5, chunk_bytes=CHUNK_BYTES)

# How often the dispatcher asks the scheduler which workers there are while chunks are running or
# queued: how long a dead worker's chunks wait before they run again. One small RPC each time.
MEMBERSHIP_POLL = 0.5


# ---- the codec --------------------------------------------------------------------------------


class PickleCodec(SharedMemoryCodec):
    """The local codec without shared memory, its bytes shaped for dask's transport.

    A payload is the pickle as a read-only ``uint8`` array: dask serializes numpy arrays as
    out-of-band pickle-5 buffers, so the bytes go to the socket without a copy into a message.
    Items holding big arrays travel as ``Frames`` instead: those arrays beside the pickle,
    uncopied (see ``_frames``); answers come back either way.
    """

    def __init__(self, *, read_only_inputs: bool = True) -> None:
        super().__init__(threshold=0, read_only_inputs=read_only_inputs)

    def encode(self, items: list[Any], arena: int | None, budget: int | None = None) -> Encoded:
        if _frames.has_big_array(items):  # views of the caller's arrays: no budget to keep
            framed = _frames.encode(items, read_only=self.read_only_inputs)
            if framed is not None:
                return Encoded(framed, framed.nbytes)
        return self._one_pickle(items, budget)

    def in_band(self, payload: _frames.Frames) -> Any:
        """``payload`` as one pickle, its arrays copied into it: for a dask worker without room
        in /dev/shm for its frames (``_frames.NoRoom``). Its arrays unpickle as views of the
        frames, which are the caller's arrays: nothing is copied but into the pickle. Raises
        what pickling raises."""
        return self._one_pickle(_frames.decode(payload, writable=False)).payload

    def _one_pickle(self, items: list[Any], budget: int | None = None) -> Encoded:
        encoded = super().encode(items, None, budget)
        return Encoded(np.frombuffer(encoded.payload, dtype=np.uint8), encoded.nbytes)

    def keep(self, encoded: Encoded, items: list[Any]) -> list[Any]:
        return items  # a payload's frames are views of these very arrays: keeping them is free

    def decode(self, result: Any) -> Any:
        if isinstance(result, _frames.Frames):
            return decoded_result(_frames.decode(result))
        return super().decode(memoryview(result))

    def release(self, items: Any, arena: int | None) -> None:
        pass  # nothing is in shared memory

    def drop(self, result: Any) -> None:
        pass



# ---- the client side ----------------------------------------------------------------------------


class DaskBackend:
    """Runs chunks on a dask cluster: an in-process ``LocalCluster``, one at ``address``, or the
    cluster of an existing ``client`` (never closed here)."""

    def __init__(self, options: BackendOptions, *, hosted: Callable[[BackendOptions], Backend],
                 address: str | None = None, client: Any = None) -> None:
        self._cluster, self._client = _cluster.connect(options.workers, address, client,
                                                       options.mem_per_task)
        self._own_client = client is None
        self._address: str = self._client.scheduler.address  # gone from a closed client
        self._name = f"stagepool-{uuid.uuid4().hex[:12]}"
        self._codec = PickleCodec(read_only_inputs=not options.writable_inputs)
        self._queue = FairShare()
        self._lock = self._queue.lock
        self._mem_per_task = options.mem_per_task
        self._roster = Roster(self._client, options.mem_per_task, vet=True)
        self._inbox: Inbox = queue.SimpleQueue()
        self._flights = Flights(self._client, self._name, self._queue, self._inbox,
                               self._codec.in_band)
        self._closed = self._stopping = False
        self._closed_why = "this engine has been shut down; create a new Engine"
        self._polled = 0.0
        self._thread = threading.Thread(target=self._run, name="stagepool-dask", daemon=True)
        try:
            # A cluster of our own dies with this process; one we connect to outlives it.
            watch = None if self._cluster is not None else owner(self._client)
            self._client.register_plugin(HostPlugin(self._name, options, hosted, watch),
                                         name=self._name)
            self._await_first_worker()
        except BaseException:
            self._close()
            raise
        self._thread.start()
        _live_backends.add(self)

    def _await_first_worker(self) -> None:
        """Raises ``RuntimeError`` when no worker comes, or when one runs another stagepool."""
        self._refresh_or_refuse()
        if not self._roster.members:
            _cluster.wait_for_first_worker(self._client, self._address)
            self._refresh_or_refuse()
        self._roster.check_fits(self._address)

    def _refresh_or_refuse(self) -> None:
        self._roster.refresh()
        if self._roster.refused:
            raise RuntimeError("; ".join(self._roster.refused.values()))

    def __str__(self) -> str:
        return self._describe(self._roster)

    def _describe(self, roster: Roster) -> str:
        own = "in-process LocalCluster" if self._cluster is not None else "dask cluster"
        return f"{own} at {self._address}, {roster}"

    def cluster_now(self) -> tuple[int, str] | None:
        """The cluster as the scheduler sees it now, for ``engine.plan``: the chunks it may run
        at once (its threads, fewer if ``mem_per_task`` says so) and its description; None when
        the scheduler does not answer in RPC_TIMEOUT or the engine is closed. Any thread: a
        roster of its own (the dispatcher's follows the cluster only while it has work)."""
        if self._closed:
            return None
        roster = Roster(self._client, self._mem_per_task, refused=self._roster.refused)
        try:
            roster.update(_cluster.workers_info(self._client))
        except Exception:
            return None
        return roster.slots, self._describe(roster)

    # ---- the Backend protocol ---------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Chunks the cluster may run at once now: its threads, fewer if ``mem_per_task`` says so."""
        return max(1, self._roster.slots)

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
            if not self._queue and not self._flights:
                # Work after a pause: the dispatcher looks at the cluster before sending, so a
                # worker the scheduler already knows has left is never sent (and blamed for) a
                # chunk; while busy, it looks every MEMBERSHIP_POLL seconds.
                self._polled = 0.0
            refused = [task for task in tasks if not self._queue.queue_locked(task)]
        self._inbox.put(None)  # wake the dispatcher
        for task in refused:
            notify(task, Cancelled("batch cancelled"))

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Never blocks and takes no lock (it may run in a garbage collector's finalizer):
        SimpleQueue.put is re-entrant; the dispatcher does the rest."""
        group.cancelled = True
        self._inbox.put(Call(functools.partial(self._withdraw_now, group, kill_running)))

    def withdraw_task(self, task: Task) -> None:
        self._inbox.put(Call(functools.partial(self._withdraw_task_now, task)))

    def lane_states(self) -> list[LaneState]:
        return self._flights.lane_states(self._roster.members.values())

    def worker_pids(self) -> list[int]:
        """The lanes' pids on every worker (on their hosts: a remote pid names a remote process)."""
        return [] if self._closed else _cluster.worker_lane_pids(self._client, self._name)

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        with self._lock:
            self._closed = True
        for task in self._queue.drain() if cancel_pending else ():
            notify(task, SHUT_DOWN)
        self._inbox.put(Call(functools.partial(self._stop, kill, cancel_pending)))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- the dispatcher thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self._stopping and not self._flights and not self._queue):
                self._step()
        finally:
            self._close()

    def _step(self) -> None:
        busy = bool(self._flights or self._queue)
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
        if (self._flights or self._queue) and time.monotonic() - self._polled >= MEMBERSHIP_POLL:
            self._refresh_workers()
        self._dispatch()

    def _handle(self, message: Done | Freed | Call | None) -> None:
        if isinstance(message, Call):
            message.fn()
        elif message is not None:
            self._flights.finish(message)

    def _refresh_workers(self) -> None:
        """Follow the cluster: workers that joined get chunks, the chunks of workers that left
        run elsewhere or fail (``Flights.lose``)."""
        self._polled = time.monotonic()
        refused = set(self._roster.refused)
        for member in self._roster.refresh():
            self._flights.lose(member)
        for address in self._roster.refused.keys() - refused:  # joined: say it, once
            LOGGER.warning("%s; it gets no chunks of this engine", self._roster.refused[address])

    def _dispatch(self) -> None:
        while True:
            worker = self._roster.free()
            if worker is None:
                return
            ahead = worker.busy >= worker.capacity.slots
            task = self._queue.take(_may_wait_ahead if ahead else _any)
            if task is None:
                return
            if task.on_start is not None and not task.on_start(task):
                notify(task, Cancelled("future cancelled"))
                continue
            if not self._flights.send(worker, task):
                self._polled = 0.0  # dask refused: look at the cluster again first
                return

    def _withdraw_now(self, group: Group, kill_running: bool) -> None:
        for task in self._queue.withdraw(group):
            notify(task, Cancelled("batch cancelled"))
        if kill_running:
            self._flights.kill(group, "batch cancelled")
        else:  # those sent ahead are still queued, on their worker: they never start either
            self._flights.withdraw_ahead(lambda task: task.group is group, "batch cancelled")

    def _withdraw_task_now(self, task: Task) -> None:
        if self._queue.withdraw_task(task):
            notify(task, Cancelled("future cancelled"))
        else:
            self._flights.withdraw_ahead(lambda sent: sent is task, "future cancelled")

    def _client_gone(self) -> None:
        """The client was closed under us (``Engine(backend=client)``): nothing can run again."""
        with self._lock:
            self._closed = True
            self._closed_why = "the dask client of this engine was closed; create a new Engine"
        gone = Cancelled("the dask client was closed")
        for task in self._queue.drain():
            notify(task, gone)
        self._flights.kill(None, gone.reason)
        self._stopping = True

    def _stop(self, kill: bool, cancel_pending: bool) -> None:
        self._stopping = True
        if kill:
            self._flights.kill_for_shutdown(SHUT_DOWN.reason)
        elif cancel_pending:  # pending includes what waits ahead in a worker's queue
            self._flights.withdraw_ahead(_any, SHUT_DOWN.reason)

    def _close(self) -> None:
        """Remove this engine from the workers (their lanes are killed), then close what we
        opened. Every step is bounded and a failure skips to the next: nothing may hang here."""
        _live_backends.discard(self)
        self._flights.abandon(SHUT_DOWN)
        for task in self._queue.drain():
            notify(task, SHUT_DOWN)
        with contextlib.suppress(Exception):
            _cluster.unregister(self._client, self._address, self._name)
        if self._own_client:
            with contextlib.suppress(Exception):
                self._client.close(timeout=RPC_TIMEOUT)
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                _cluster.close_own_cluster(self._cluster)


def _any(task: Task) -> bool:
    return True


def _may_wait_ahead(task: Task) -> bool:
    """Whether a chunk may wait in a busy worker's queue. Not a single call (on_start set): it is
    "running" once sent, and a cancel() could no longer withdraw it there. Not a chunk that is
    long or of unknown length: it would wait behind the running one while another worker frees
    up and starts shorter work first (cost hints dispatch longest-first; a batch's first
    chunks are of unknown length)."""
    return (task.on_start is None and task.expected is not None
            and task.expected <= AHEAD_MAX_SECONDS)


# A chunk expected to take longer does not wait ahead (see _may_wait_ahead): waiting behind a
# running chunk costs the batch at most this much at its tail.
AHEAD_MAX_SECONDS = 0.5

_live_backends: weakref.WeakSet[DaskBackend] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """An engine left open at exit: kill its lanes and close its cluster before dask's own exit
    handlers tear the client down under it."""
    for backend in list(_live_backends):
        backend.shutdown(wait=True, cancel_pending=True, kill=True)
