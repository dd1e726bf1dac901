"""The worker side of the dask backend: a local backend hosted in each dask worker, and the task
function that hands it one chunk. Both run in dask workers, which unpickle them by reference (so
they stay module-level names here)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import queue
from collections.abc import Callable
from typing import Any

import distributed
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils import sync

from ... import _shm
from ..._errors import EngineClosed
from ..._planning import plan_workers
from .._protocol import (
    Backend,
    BackendOptions,
    Cancelled,
    Group,
    LaneDied,
    LaneState,
    Task,
    TaskResult,
)
from ._frames import FRAME_BYTES, Frames, NoRoom, from_blob, to_blob
from ._memory import capacity
from ._owner import watch_owner

__all__ = ["RETIRED", "SHUT_DOWN", "HostPlugin", "end_note", "ended_topic", "lane_pids", "run_chunk",
           "started"]

# How often a waiting chunk on a worker looks at its dask task's state (cancelled: kill it).
CANCEL_POLL = 0.1


# The bound on telling the scheduler that a chunk ended while another of ours waits behind it
# (see HostPlugin._record_end); past it the chunk is answered all the same.
END_RECORD_TIMEOUT = 5.0
# A task of ours in these states on a worker has not started: it waits behind a running one.
_WAITING = frozenset({"waiting", "ready", "constrained"})

SHUT_DOWN = Cancelled("the engine was shut down")
# The key of a closing worker's record of the chunks it was running: {chunk key: items started}.
RETIRED = "retired"


def ended_topic(name: str, address: str) -> str:
    """The scheduler's event topic where engine ``name``'s plugin on the worker at ``address``
    records the chunks that ended there (see ``HostPlugin._record_end``)."""
    return f"{name} ended on {address}"


class HostPlugin(WorkerPlugin):
    """One engine's presence on a dask worker: a hosted backend with one lane per chunk the
    worker may run at once (its threads, fewer if ``mem_per_task`` says so: see ``_memory``).

    Registered by the engine under its own name, so engines sharing a cluster never share lanes,
    initializers or function keys; removed (and its lanes killed) when the engine shuts down, or
    by the workers once the engine's client (``owner``: its id, and how long it may be away
    before it counts as gone) has left the scheduler: see ``_owner``.
    """

    def __init__(self, name: str, options: BackendOptions,
                 hosted: Callable[[BackendOptions], Backend],
                 owner: tuple[str, float] | None = None) -> None:
        self.name = name
        self.options, self.hosted, self.owner = options, hosted, owner
        self.backend: Backend | None = None
        self.worker: Any = None
        # The chunks in run(), by key: a plain dict, whose single operations are atomic (run()
        # adds and pops from dask's threads, teardown takes it all from the event loop).
        self.running: dict[str, Task] = {}
        self.hosting = False
        self.watcher: asyncio.Task[None] | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # never a live backend
        return (HostPlugin, (self.name, self.options, self.hosted, self.owner))

    def setup(self, worker: Any) -> None:
        # Dask starts worker processes as daemons, and a daemonic process may not start children.
        # The flag exists so that children cannot outlive their parent; our lanes watch their
        # parent and exit within 0.25 s of its death (see _worker._watch_parent), so lifting it
        # keeps that promise.
        multiprocessing.current_process().daemon = False
        self.worker, self.hosting = worker, True
        if self.owner is not None:  # setup runs on the worker's event loop
            client_id, grace = self.owner
            self.watcher = asyncio.get_running_loop().create_task(  # held: the loop holds weakly
                watch_owner(worker, client_id, grace, self.name, lambda: self.hosting))
        threads = worker.state.nthreads
        lanes = capacity(threads, worker.state.total_resources,
                         worker.memory_manager.memory_limit, self.options.mem_per_task).slots
        if not lanes:  # mem_per_task fits no chunk here: the engine sends this worker none
            return
        env = {**_lane_thread_env(threads), **self.options.env}
        self.backend = self.hosted(dataclasses.replace(self.options, workers=lanes, env=env,
                                                       shm_threshold=FRAME_BYTES, template=False))

    async def teardown(self, worker: Any) -> None:
        """Kill our lanes: the engine removed us, or the worker closes (retired: then first
        record how far each running chunk got, for the engine to charge those runs)."""
        backend, self.backend, self.hosting = self.backend, None, False
        if backend is None:
            return
        if worker.status.name != "running":  # closing: retired, or its nanny stops it
            with contextlib.suppress(Exception):  # unrecorded: the engine charges nothing
                await asyncio.wait_for(self._record_retirement(backend), END_RECORD_TIMEOUT)
        # in a thread: killing and joining must not stall the worker
        await asyncio.to_thread(backend.shutdown, wait=True, cancel_pending=True, kill=True)

    async def _record_retirement(self, backend: Backend) -> None:
        """Tell the scheduler, before the lanes are killed, which chunks this closing worker
        was running and how many of their items ran (``started``), under the engine's
        ``ended_topic``; those chunks then record no end of their own (they end cancelled)."""
        running, self.running = self.running, {}
        msg = {RETIRED: started(running, backend.lane_states())}
        await self.worker.scheduler.log_event(topic=ended_topic(self.name, self.worker.address),
                                              msg=msg)

    def run(self, key: str, fn_key: int, fn: bytes, items: Any, n_items: int,
            timeouts: tuple[float, ...] | None, per_item_clock: bool) -> TaskResult:
        """Run one chunk on this worker's lanes and return their answer; kill the chunk if its
        dask task is cancelled meanwhile (the engine's kill, or its client gone)."""
        backend = self.backend
        if backend is None:  # torn down: the engine is shutting down
            return SHUT_DOWN
        blob = to_blob(items) if isinstance(items, Frames) else memoryview(items)
        if blob is None:  # nothing ran: the client sends it again in-band (see _frames)
            return self._ended(key, NoRoom(self._where(), items.nbytes))
        answers: queue.SimpleQueue[TaskResult] = queue.SimpleQueue()
        task = Task(Group(), fn_key, fn, blob, n_items, lambda _task, answer: answers.put(answer),
                    timeouts, per_item_clock=per_item_clock)
        try:
            return self._run(backend, key, task, answers)
        finally:
            if isinstance(items, Frames):  # the lanes mapped what they read: unlink them
                _shm.discard(blob)

    def _run(self, backend: Backend, key: str, task: Task,
             answers: queue.SimpleQueue[TaskResult]) -> TaskResult:
        self.running[key] = task
        try:
            backend.submit_many([task])
        except EngineClosed:
            self.running.pop(key, None)
            return SHUT_DOWN
        while True:
            try:
                answer = self._reply(answers.get(timeout=CANCEL_POLL))
            except queue.Empty:
                if not task.group.cancelled and self._abandoned(key):
                    backend.withdraw(task.group, kill_running=True)
                continue
            # Taken by a retirement's record (``teardown``) unless it had answered in full.
            if self.running.pop(key, None) is not None or not isinstance(answer, LaneDied | Cancelled):
                self._ended(key, answer)
            return answer

    def _ended(self, key: str, answer: TaskResult) -> TaskResult:
        """Record that chunk ``key`` ended with ``answer`` (``_record_end``); return ``answer``."""
        with contextlib.suppress(Exception):  # unrecorded: the old window, see _record_end
            sync(self.worker.loop, self._record_end, key, end_note(answer),
                 callback_timeout=END_RECORD_TIMEOUT)
        return answer

    async def _record_end(self, key: str, note: dict[str, Any]) -> None:
        """Tell the scheduler that chunk ``key`` ended here, before this thread is free to start
        the next one: if one of ours waits behind it, wait for the scheduler's word (one
        round trip, worker to scheduler), so that a worker killed by the next chunk's item
        cannot pass for one killed while running this chunk (its "finished" may still be on
        its way to the client: the report window, in which the engine would have blamed it).
        Else the record goes out with the worker's next batch of messages, at no wait.
        ``note`` says how it ended (``end_note``), for an engine that never gets the answer."""
        topic, msg = ended_topic(self.name, self.worker.address), {"key": key, **note}
        prefix = self.name + "-"
        if any(ts.state in _WAITING and ts.key.startswith(prefix)  # on the loop: a safe read
               for ts in self.worker.state.tasks.values() if isinstance(ts.key, str)):
            await self.worker.scheduler.log_event(topic=topic, msg=msg)
        else:
            self.worker.log_event(topic, msg)

    def _abandoned(self, key: str) -> bool:
        """Whether dask gave up on our task (the engine cancelled it, or its client is gone)."""
        state = self.worker.state.tasks.get(key)  # a dict read: safe from this thread
        return state is None or state.state in ("cancelled", "released", "forgotten")

    def _reply(self, answer: TaskResult) -> TaskResult:
        if isinstance(answer, LaneDied):
            return dataclasses.replace(answer, where=self._where())
        if isinstance(answer, Cancelled):
            return answer
        return from_blob(answer)  # sent out-of-band, like the inputs

    def _where(self) -> str:
        return f"dask worker {self.worker.address}"


def end_note(answer: TaskResult) -> dict[str, Any]:
    """How a chunk ended, for its end record (plain values: the scheduler keeps it): the lanes'
    ``LaneDied`` whole under "died", a ``Cancelled`` reason under "cancelled" (nothing ran);
    nothing more for an answer, whose every item ran. ``NoRoom`` counts as cancelled: nothing ran,
    so a chunk whose worker dies before the client has that answer runs again uncharged."""
    if isinstance(answer, NoRoom):
        return {"cancelled": "no room in /dev/shm"}
    if isinstance(answer, LaneDied):
        return {"died": dataclasses.asdict(answer)}
    if isinstance(answer, Cancelled):
        return {"cancelled": answer.reason}
    return {}


def started(running: dict[str, Task], states: list[LaneState]) -> dict[str, int | None]:
    """Per chunk key: how many of its items had started on the lanes (``states``), the one
    running included; 0 for a chunk no lane has taken yet; None when unknown (a lane decoding
    or encoding it: the engine then counts all of them)."""
    offsets = {state.task: state.offset for state in states if state.task}
    counts: dict[str, int | None] = {}
    for key, task in running.items():
        offset = offsets.get(task.id)
        counts[key] = 0 if offset is None else offset + 1 if offset >= 0 else None
    return counts


def _lane_thread_env(threads: int) -> dict[str, str]:
    """The native thread budget of a worker's lanes. The worker's own environment decides: dask's
    nanny sets OMP/MKL/OPENBLAS_NUM_THREADS (1 per worker), and the variables it leaves unset
    (BLIS, NUMEXPR, VECLIB) get the same, not this host's CPUs // the worker's threads: several
    workers share a host (a LocalCluster: 2 x 1 thread on 2 CPUs gave each lane 2 BLIS threads
    beside OpenMP's 1, four threads on two cores). Without OMP_NUM_THREADS: CPUs // threads."""
    budget = plan_workers().thread_env(workers=threads)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        budget = dict.fromkeys(budget, omp)
    return budget


def run_chunk(name: str, key: str, *chunk: Any) -> TaskResult:
    """The dask task of one chunk: runs in a dask worker's thread, which waits while this
    engine's lanes on that worker run the items (``chunk``: see ``HostPlugin.run``)."""
    worker = distributed.get_worker()
    host = worker.plugins.get(name)
    if not isinstance(host, HostPlugin):
        return LaneDied(os.getpid(), None, -1, "crash",
                        f"stagepool is not set up on this dask worker (plugin {name} missing)",
                        where=f"dask worker {worker.address}")
    return host.run(key, *chunk)


def lane_pids(name: str, dask_worker: Any) -> list[int]:
    """Run by ``client.run`` on each worker: the pids of this engine's lanes there."""
    host = dask_worker.plugins.get(name)
    backend = host.backend if isinstance(host, HostPlugin) else None
    return backend.worker_pids() if backend is not None else []

