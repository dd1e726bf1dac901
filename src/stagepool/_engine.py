"""The engine: a thin facade over a backend, the batch driver and the single-call path.

Data flow of one batch (``map``, ``imap`` and the async calls all run the same driver, in the
caller's thread or, for async callers, a pooled helper thread; never in the event loop):

    items (list, iterator, async iterator)
      -> Batch (_batch.py): cuts chunks (ChunkSizer: adaptive, payload-bounded), keeps a bounded
            window in flight, has each chunk encoded by the backend's codec
      -> backend.submit_many(Tasks): local worker processes (_backends/_local/: lanes + a shared
            record naming the running item), in-process (_backends/_serial.py), or a dask cluster
            (_backends/_dask/: a chunk is one dask task, run by lanes hosted on its worker)
      -> _worker_loop.run_chunk in the worker: each item timed, value or exception captured
      -> the backend reports facts: an answer | "worker died while on item k" (k may be unknown:
            the driver then halves the chunk until the guilty item is alone) | cancelled
      -> Answers (_answers.py): final pieces, retries (_failures.py: the failure vocabulary)
      -> _streams.py: the report (columnar), or outcomes in order or as they finish
      -> BatchReport / Outcome

Pipelines (``run``, ``run_iter`` and their async forms, ``_pipeline/``) are one such batch per
group of fused stages, all at once on the same backend, linked by bounded inboxes.

Single calls (``submit``, the Executor view) are one-item tasks resolved in the backend's thread
(_single.py). Nothing is dropped or duplicated: each taken index is tracked until it has a final
piece.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._abandon import release_when_dropped
from ._aio import AsyncCalls
from ._answers import BatchPolicy
from ._backends import Backend, BackendName, make_backend
from ._config import (
    DEFAULT,
    DEFAULT_RETRY_ON,
    Default,
    EngineConfig,
    Timeout,
)
from ._errors import EngineClosed, OvercommitWarning
from ._pipeline._calls import PipelineCalls
from ._planning import WorkerPlan, choose_workers, cluster_plan, overcommit_warning, plan_workers
from ._pressure import DEFAULT_HIGH, check_watermarks
from ._single import ExecutorView, SubmitContext
from ._startup import backend_choice, backend_options, memory_watch, refuse_on_serial
from ._status import WorkerStatus, resolve
from ._template_boot import discard_on_failure

if TYPE_CHECKING:
    from ._options import EngineView

__all__ = ["Engine"]


# Chunks of one batch in flight at once, per worker. Two keeps every worker fed while a result
# travels back; more only holds memory (and makes other batches wait longer for their turn).
IN_FLIGHT_PER_WORKER = 2


class Engine(AsyncCalls, PipelineCalls):
    """A pool of workers that gives every item exactly one :class:`Outcome`.

    ``workers="auto"`` asks :func:`plan_workers` (CPUs, affinity, cgroup quotas, memory per task);
    ``engine.plan`` says what the machine allows and why, ``engine.workers`` what runs, and
    ``repr(engine)`` how that was chosen. An explicit ``workers=N`` may exceed the plan (with an
    :class:`OvercommitWarning` when N x ``mem_per_task`` does not fit in memory). The environment
    variable ``STAGEPOOL_MAX_WORKERS`` is a ceiling on both: it lowers the count, never raises it.
    The workers start here, once, and serve every batch until :meth:`shutdown` (or the end of a
    ``with`` block). An engine garbage-collected without either (nothing references it, not even
    a stream of its outcomes) is shut down without waiting, with a ``ResourceWarning``: queued
    and running work finishes, then its workers, threads and shared memory go.

    All options are keyword-only and validated here: a bad value raises ``TypeError`` or
    ``ValueError`` naming the argument, before any process starts.

    Failure handling: an item that raises, times out, crashes its worker or cannot be pickled
    fails alone, as an outcome; the engine keeps serving. ``retries`` re-runs failed items whose
    kind or exception type is in ``retry_on``, after ``backoff * 2**(attempt - 1)`` seconds. The
    default retries what is usually transient, ``("crash", "timeout")``: an item that raised (a
    corrupt file) would most likely raise again, so errors are retried only when ``retry_on``
    names ``"error"`` or the exception's type.

    Options (sizes take ints in bytes or strings such as ``"512MiB"``):

    * ``workers``, ``mem_per_task``, ``reserve_cores``: how many processes; "auto" plans from
      the machine, the memory each task needs and the CPUs to leave to this process (one that
      decodes while the workers analyse), see :func:`plan_workers`; BLAS threads per worker
      share the CPUs left. ``mem_per_task`` is also a cap: unless ``max_rss_per_worker`` is
      given, a worker's private memory may reach ``4 x mem_per_task + 512 MiB`` and an item that
      allocates past it fails alone with ``MemoryError`` (a 6 GiB item given
      ``mem_per_task="1GiB"``), instead of dragging the machine into the OOM killer.
    * ``chunk_size``: items per message to a worker; "auto" learns it (about 20 ms of work per
      chunk, at most 4 MiB of payload, a single item first). ``max_in_flight``: chunks of one batch
      submitted and not yet consumed (default 2 per worker + 1); with ``imap`` on an endless
      iterator this is the memory bound.
    * ``timeout`` (seconds, or a function of the item), ``retries``, ``retry_on``, ``backoff``.
      A function ``timeout`` is called each time its item is sent, so again when the item goes
      out again (a retry, a crash's innocents, a chunk cut short): keep it cheap and pure.
    * ``rerun_innocent``: when a worker dies, the items of its chunk that had already run lost
      their results with it. True (default): they run again, and ``attempts`` counts every run.
      False (at most once, for stages that must not run twice: uploads, charges, appends): they
      are reported as kind ``"crash"`` saying their result was lost, and not retried either (a
      retry would be their second run); items that had not started still run. Retries of
      items that failed on their own (``retries``, ``retry_on``) still apply.
    * ``max_rss_per_worker``, ``max_tasks_per_worker``: recycle a worker that grew past a size or
      ran that many items; a runaway allocation becomes that item's ``MemoryError``.
    * ``initializer(*initargs)`` runs once in each worker; if it raises, every item sent to that
      worker fails with :class:`InitializerError`; if it kills the worker (segfault,
      ``os._exit``), no worker is started again and every item fails with :class:`WorkerCrashed`
      naming the initializer; if it runs longer than ``init_timeout`` seconds (default 600;
      None: no limit), the worker is killed with its child processes and every item fails with
      :class:`InitializerError` naming the hang (not enforced on the serial backend, where the
      initializer runs in your process at construction).
    * ``shared``: read-only data every task needs (a filterbank, a model's weights, a lookup
      table), as ``{name: value}``, read inside a task (or the initializer) with
      ``stagepool.shared(name)``. Passed once: numpy arrays are placed in ``/dev/shm`` and mapped
      read-only by every worker (the replacements of dead ones too), costing their memory once
      for the whole pool; other values are pickled once and unpickled once per worker. Freed
      when the engine shuts down (or, if this process is killed, by its workers on their way
      out). A value that cannot be pickled raises ``TypeError`` naming it, here. The serial
      backend serves a read-only copy; on dask each worker host maps its own copy.
      ``initargs`` travel the same way (their arrays as private copy-on-write views), so large
      ones never block ``Engine()`` or a respawn.
    * ``shm_threshold``: numpy arrays this big (default 1 MiB; 0 disables) travel through
      ``/dev/shm`` in both directions. Workers see read-only views of their inputs, and every
      smaller input array is read-only too, so an in-place change fails at any size
      (``writable_inputs=True``: private writable copies, copy-on-write for the big ones; the
      serial backend passes your own objects); results arrive as ordinary
      writable arrays whose memory is freed when the caller drops them.
    * ``preload``: module names (``("numpy", "scipy.signal", "mystage")``) imported once into
      the warm template the local workers are forked from, so a worker started at any time (at
      start-up, or replacing one lost to a timeout, crash, kill or recycle) starts with them
      already imported. A module that fails to import there is reported on stderr and left to
      the workers. Ignored by the serial and dask backends.
    * ``progress``: a tqdm bar per batch.
    * ``memory_high``, ``memory_low`` (fractions of the memory this process may use: the
      fuller of its cgroup limit and the machine): a batch pauses dispatch at ``memory_high``
      (default 0.8) and resumes below ``memory_low`` (default ``memory_high - 0.1``; half of
      a ``memory_high`` of 0.1 or less); running items finish; ``report.stats`` counts the
      pauses. None disables it. Not on dask, whose workers pause themselves at 80%.
    * ``backend``: where chunks run. ``"local"`` (default): worker processes on this machine.
      ``"serial"``: in this process, one chunk at a time, with the same outcomes, ordering,
      retries, progress and report: for debugging (breakpoints, coverage and profilers work as
      in plain Python) and fast tests. It cannot stop a running item (``timeout=`` raises
      ``ValueError``), survive an item that kills the process, kill running work on cancel, or
      cap memory per worker (``max_rss_per_worker`` / ``max_tasks_per_worker`` raise), all
      checked before the initializer runs. ``workers`` is ignored there: no process starts.
      ``"dask"``: on a dask.distributed cluster (``pip install "stagepool[dask]"``): the one at
      ``address`` (``"tcp://host:8786"``), or an in-process ``LocalCluster`` of ``workers``
      processes on this machine (closed with the engine); or pass an existing
      ``distributed.Client`` as ``backend``. The cluster's threads are the workers (``engine.plan``
      says so). Outcomes, blame, timeouts, retries, memory caps and cancellation are as locally
      (each dask worker hosts one worker process per thread); arrays travel with dask's transport,
      not shared memory. A worker the cluster loses fails only the item it was running.
    """

    @discard_on_failure  # a refused engine leaves no process, not even the template started early
    def __init__(
        self,
        *,
        workers: int | str = "auto",
        mem_per_task: int | str | None = None,
        chunk_size: int | str = "auto",
        max_in_flight: int | None = None,
        progress: bool = False,
        timeout: Timeout = None,
        retries: int = 0,
        retry_on: Any = DEFAULT_RETRY_ON,
        backoff: float = 0.0,
        max_rss_per_worker: int | str | None = None,
        max_tasks_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        shm_threshold: int | str = "1MiB",
        writable_inputs: bool = False,
        rerun_innocent: bool = True,
        init_timeout: float | None = 600.0,
        preload: tuple[str, ...] = (),
        backend: BackendName | Any = "local",
        address: str | None = None,
        shared: Mapping[str, Any] | None = None,
        reserve_cores: int = 0,
        memory_high: float | None = DEFAULT_HIGH,
        memory_low: float | None = None,
    ) -> None:
        name, client = backend_choice(backend, address)
        marks = check_watermarks(memory_high, memory_low)
        remote = client is not None or address is not None
        self.config = EngineConfig.create(
            shm_threshold=shm_threshold, writable_inputs=writable_inputs,
            workers=workers, mem_per_task=mem_per_task, chunk_size=chunk_size,
            max_in_flight=max_in_flight, progress=progress, timeout=timeout, retries=retries,
            retry_on=retry_on, backoff=backoff, max_rss_per_worker=max_rss_per_worker,
            max_tasks_per_worker=max_tasks_per_worker, initializer=initializer, initargs=initargs,
            rerun_innocent=rerun_innocent, init_timeout=init_timeout, shared=shared,
            reserve_cores=reserve_cores, preload=preload)
        if remote and self.config.workers is not None:
            raise ValueError("workers= sizes the in-process dask cluster only; a cluster you "
                             "connect to (address= or a Client) brings its own workers")
        self._plan: WorkerPlan = plan_workers(mem_per_task=self.config.mem_per_task,
                                              reserve_cores=self.config.reserve_cores)
        if name == "serial":  # no process to size, warn about or open files for
            refuse_on_serial(self.config)  # before the initializer runs, in this process
            self.workers, self._sizing = 1, "serial: 1 worker, this process"
        else:
            self._size_workers(warn=not remote)
        self._lock = threading.Lock()
        self._pid = os.getpid()  # a forked child inherits the engine, not its workers
        self._executor: ExecutorView | None = None
        started = make_backend(name, backend_options(self.config, self._plan, name, self.workers),
                               address=address, client=client)
        self._backend: Backend | None = started
        self._backend_name = name
        if name == "dask":  # the cluster decides
            self.workers = started.workers
            self._plan, self._sizing = cluster_plan(self._plan, started.workers, str(started))
        self._policy = BatchPolicy(
            self.config.retries, self.config.retry_on, self.config.backoff,
            self.config.max_in_flight or IN_FLIGHT_PER_WORKER * started.workers + 1,
            self.config.rerun_innocent, memory_watch(name, marks),
            self.config.max_tasks_per_worker)
        self._submits = SubmitContext(started, self._policy, self.config.timeout)
        self._on_drop = release_when_dropped(self, started, f"{name}, {self.workers} workers")

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str], *, cost: Callable[[Any], float] | None = None,
                     **overrides: Any) -> Engine:
        """An engine with the settings ``stagepool profile --out DIR`` recommended: ``path`` is
        its ``profile.json`` or DIR; keyword ``overrides`` win over the file. With ``cost``, the
        timeout scales with each item (``load_profile``). Raises ``ValueError`` for a file that
        is not a stagepool profile. On a cluster (``address=`` or a ``Client`` as ``backend``)
        the file's ``workers`` is left out: the cluster brings its own, as in the sweep."""
        from ._profile_file import load_profile  # json and validation, imported only when used

        settings = load_profile(path, cost=cost)
        if overrides.get("address") is not None or not isinstance(overrides.get("backend", ""), str):
            settings.pop("workers", None)
        return cls(**{**settings, **overrides})

    @property
    def plan(self) -> WorkerPlan:
        """What the machine allows and why (see :func:`plan_workers`). On a cluster, its workers
        and threads as the scheduler sees them now, joined and left (one scheduler call, bounded;
        the last known plan when it does not answer, or after shutdown)."""
        # Only the dask backend has a cluster to follow (duck-typed: the engine never imports it).
        now = getattr(self._backend, "cluster_now", None)
        sized = now() if now is not None else None
        if sized is not None:
            self._plan = cluster_plan(self._plan, *sized)[0]
        return self._plan

    def _size_workers(self, *, warn: bool) -> None:
        self.workers, self._sizing = choose_workers(self._plan, self.config.workers)
        overcommit = overcommit_warning(self._plan, self.workers) if warn else None
        if overcommit is not None:  # the user insisted: start as told, but say so at their line
            # stacklevel: this method, __init__, its discard_on_failure guard, the caller's line
            warnings.warn(overcommit, OvercommitWarning, stacklevel=4)

    def with_options(self, *, timeout: Timeout | Default = DEFAULT,
                     retries: int | Default = DEFAULT, retry_on: Any = DEFAULT,
                     backoff: float | Default = DEFAULT) -> EngineView:
        """A light view of this engine whose ``submit``, ``map``, ``imap``, async calls and
        ``executor`` use these failure options (the others stay the engine's), on the same
        workers: ``engine.with_options(timeout=30, retries=2).submit(decode, path)``. Validated
        here as ``Engine()`` validates them (``timeout=`` raises ``ValueError`` on the serial
        backend); raises ``EngineClosed`` after shutdown. See :class:`EngineView`."""
        from ._options import EngineView

        return EngineView(self, timeout=timeout, retries=retries, retry_on=retry_on,
                          backoff=backoff)

    @property
    def backend(self) -> str:
        """The name of the backend this engine runs on (``"local"``, ``"serial"`` or ``"dask"``)."""
        return self._backend_name

    @property
    def capabilities(self) -> Any:
        """What the backend can do (exact blame, hard timeouts, shared memory, ...)."""
        return self._backend_or_raise().capabilities

    def _backend_or_raise(self) -> Backend:
        backend = self._backend
        if backend is None:
            raise EngineClosed("this engine has been shut down; create a new Engine")
        if os.getpid() != self._pid:  # else the batch would wait forever for an absent thread
            raise EngineClosed(
                f"this Engine was created in process {self._pid}; this process ({os.getpid()}) "
                "is a fork of it, where its workers and pool thread do not exist: create a new "
                "Engine in the child")
        backend.check_open()  # it may have failed on its own: EngineClosed, naming the cause
        return backend

    def __repr__(self) -> str:
        closed = ", closed" if self._backend is None else ""
        return f"<stagepool.Engine {self._sizing}{closed}>"

    # ---- context management ------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut down. Leaving normally waits for the queued and running work; an exception or
        Ctrl-C leaving the block stops it instead (``shutdown(kill=True)``: queued and running
        items get kind ``"cancelled"``), within about a second even with a hung item, as
        ``map``'s own Ctrl-C does: nobody is left to read those results."""
        self.shutdown(wait=True, kill=exc[0] is not None)

    # ---- lifecycle ------------------------------------------------------------------------------

    def status(self) -> list[WorkerStatus]:
        """What each worker is doing now: idle, or busy on which item of which batch, for how
        long (:class:`WorkerStatus`). Cheap and non-blocking: an ``on_progress`` callback may
        call it. On dask, per worker thread, the item inside a chunk is not known. Raises
        :class:`EngineClosed` after shutdown."""
        return resolve(self._backend_or_raise().lane_states())

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (on dask: on the workers' hosts, asked for now)."""
        backend = self._backend
        return backend.worker_pids() if backend is not None else []

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 kill: bool = False) -> None:
        """Stop the workers. Idempotent.

        ``wait``: block until queued work is done and the workers have exited. Without waiting,
        the queued and running work still finishes, even when the interpreter exits meanwhile
        (the exit waits for it, as with the standard library's executors); an engine never shut
        down is killed at interpreter exit instead, so a forgotten one cannot hang it.
        ``cancel_futures``: queued items that have not started get outcome kind ``"cancelled"``
        (futures are cancelled). ``kill``: kill running work at once (finishes within seconds even
        with hung tasks); its items get kind ``"cancelled"``. A call running over an iterator
        (a generator) ends with the items it had read: the rest are never read from it (it may
        be endless) and get no outcome, so that call's report is shorter than the input; over
        a list, tuple or range every item gets one.

        KeyboardInterrupt: Ctrl-C while waiting turns the shutdown into ``kill=True`` (running
        work is killed in the background) and propagates.
        """
        with self._lock:
            backend, self._backend = self._backend, None
        self._on_drop.detach()
        if backend is not None:
            backend.shutdown(wait=wait, cancel_pending=cancel_futures or kill, kill=kill)


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (Engine,):
    _public.__module__ = "stagepool"
