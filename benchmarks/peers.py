"""The pools under test, each behind one small adapter with the same four calls.

    peer = make_peer(spec, workers)
    peer.start()              # bring the workers up (timed apart from the runs)
    values = peer.map(fn, items)          # one batch, results in input order
    for value in peer.imap(fn, items): ...  # lazy consumption, results in order (if expressible)
    got = peer.collect(fn, items, deadline=s)  # a batch where items fail: what comes back
    seconds = peer.restart()  # a fresh pool after a crash broke this one
    peer.executor()           # a concurrent.futures.Executor (for run_in_executor), if it has one
    peer.close()

A peer is started once per (workload, peer) subprocess and reused for every run. Each adapter
imports its library lazily, so a missing optional peer fails its own row, not the harness. A call
a library cannot express raises :class:`NotExpressible` with the reason.

``collect`` runs a batch the way a user of that library would when items can fail, chosen by the
row's ``how`` option: ``"map"`` is the one-call API (which, for most peers, raises at the first
failure: :class:`Collected` then says what the call raised and what it had returned before), and
``"submit"`` / ``"imap"`` / ``"schedule"`` are the per-item workarounds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from . import workloads

__all__ = ["PEERS", "Collected", "NotExpressible", "Peer", "PeerSpec", "make_peer"]


class NotExpressible(Exception):
    """The peer has no way to express this workload; the message says why."""


@dataclasses.dataclass
class Collected:
    """What one batch with failing items gave back: per-item values and errors, or what the call
    raised instead (``raised``, first line of the exception), or that it never returned (``hung``,
    the deadline passed)."""

    values: dict[int, Any] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> exception type
    raised: str | None = None
    hung: bool = False


def describe_exception(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 100 characters of it)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100]}" if text else type(exc).__name__


def drain(results: Iterator[Any], *, continues: bool) -> Collected:
    """Read an ordered result iterator to its end. ``continues``: an item's exception is raised by
    ``next`` and the iterator goes on (multiprocessing imap, pebble map); otherwise the first
    exception ends the batch (Executor.map) and is the call's ``raised``."""
    out = Collected()
    i = 0
    while True:
        try:
            out.values[i] = next(results)
        except StopIteration:
            return out
        except Exception as exc:
            if not continues:
                out.raised = describe_exception(exc)
                return out
            out.errors[i] = type(exc).__name__
        i += 1


def gather_futures(futures: list[concurrent.futures.Future[Any]],
                   deadline: float | None) -> Collected:
    """Wait for per-item futures (at most ``deadline`` seconds); sort them into values and errors.
    Futures still pending at the deadline are cancelled and the batch is ``hung``."""
    _, pending = concurrent.futures.wait(futures, timeout=deadline)
    out = Collected(hung=bool(pending))
    for i, future in enumerate(futures):
        if future in pending:
            future.cancel()
            continue
        exc = future.exception()
        if exc is None:
            out.values[i] = future.result()
        else:
            out.errors[i] = type(exc).__name__
    return out


def one_call(call: Callable[[], list[Any]]) -> Collected:
    """A one-call map API: all values, or what it raised (it returns nothing then)."""
    try:
        return Collected(values=dict(enumerate(call())))
    except Exception as exc:
        return Collected(raised=describe_exception(exc))


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """One row of a workload: which peer, with which options, under which name.

    ``key`` is unique within a workload (``ppe-64``, ``ppe-512``); ``peer`` is the adapter name
    that ``--peers`` filters on; ``options`` go to the adapter, ``case`` to the workload (e.g. which
    input a stream row gets); ``na`` marks a row that is not run, with the reason.
    """

    key: str
    peer: str
    label: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    case: dict[str, Any] = dataclasses.field(default_factory=dict)
    na: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerSpec:
        return cls(**data)


class Peer:
    """Base adapter. Subclasses set ``name`` and override ``_start``/``map``/``close``."""

    name: ClassVar[str] = ""

    def __init__(self, workers: int, **options: Any) -> None:
        self.workers = workers
        self.options = options

    def start(self) -> None:
        """Create the pool and run a trivial batch, so lazily started pools are really up."""
        self._start()
        values = self.map(workloads.ping, list(range(4 * self.workers)))
        if values != list(range(4 * self.workers)):
            raise RuntimeError(f"{self.name}: start-up probe returned {values!r}")

    def _start(self) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        raise NotExpressible(f"{self.name} has no lazy, ordered imap in this harness")

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        """Run a batch whose items may fail, the ``how`` option's way (see the module doc)."""
        raise NotExpressible(f"{self.name} cannot run a batch with failing items here")

    @property
    def how(self) -> str:
        return str(self.options.get("how", "map"))

    def executor(self) -> concurrent.futures.Executor:
        raise NotExpressible(f"{self.name} offers no concurrent.futures.Executor")

    def restart(self) -> float:
        """Throw the pool away (hard: it may be broken or hung) and start a fresh one; seconds."""
        began = time.perf_counter()
        self.terminate()
        self.start()
        return time.perf_counter() - began

    def terminate(self) -> None:
        """Stop the pool without waiting for lost tasks (default: a normal close)."""
        self.close()

    def close(self) -> None:
        pass

    def run_extra(self) -> dict[str, Any]:
        """Numbers the peer itself reports about the last run (stagepool's stats)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"options": {k: _jsonable(v) for k, v in self.options.items()}}


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool | type(None)) else repr(value)


class SerialPeer(Peer):
    """A plain loop in one process: the floor every pool's overhead is measured against."""

    name = "serial"

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return [fn(x) for x in items]

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        out = Collected()
        for i, x in enumerate(items):
            try:
                out.values[i] = fn(x)
            except Exception as exc:
                out.errors[i] = type(exc).__name__
        return out


class _ExecutorPeer(Peer):
    """Shared by the ``concurrent.futures.Executor`` peers (ProcessPoolExecutor, loky)."""

    pool: Any
    chunksize: int

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=self.chunksize))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        # Executor.map submits every chunk before it returns: only a finite input ever gets here.
        return self.pool.map(fn, items, chunksize=self.chunksize)  # type: ignore[no-any-return]

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        if self.how == "submit":
            return gather_futures([self.pool.submit(fn, x) for x in items], deadline)
        return drain(iter(self.pool.map(fn, items, chunksize=self.chunksize)), continues=False)

    def executor(self) -> concurrent.futures.Executor:
        return self.pool  # type: ignore[no-any-return]

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def terminate(self) -> None:
        if self.name == "loky":  # loky's shutdown has no cancel_futures; it can kill the workers
            self.pool.shutdown(wait=True, kill_workers=True)
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)


# What the capped ProcessPoolExecutor row sets (stagepool caps its workers through the same
# variables; STAGEPOOL_WORKER_THREADS is what stagepool.worker_threads() reads in a task).
CAPPED_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                      "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS",
                      "STAGEPOOL_WORKER_THREADS")


class PPEPeer(_ExecutorPeer):
    """``concurrent.futures.ProcessPoolExecutor.map`` (stdlib default start method; with option
    ``blas_threads``: spawned workers with their native thread pools capped at that)."""

    name = "ppe"

    def _start(self) -> None:
        context = None
        threads = self.options.get("blas_threads")
        if threads:  # capped: fresh (spawned) workers that read the thread variables at start
            import multiprocessing

            os.environ.update(dict.fromkeys(CAPPED_THREAD_VARS, str(threads)))  # this row only
            context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers,
                                                           mp_context=context)
        self.chunksize = int(self.options.get("chunksize", 1))

    def describe(self) -> dict[str, Any]:
        import multiprocessing

        return {**super().describe(), "start_method": multiprocessing.get_start_method()}


class MpPoolPeer(Peer):
    """``multiprocessing.Pool`` (``map`` with its default chunking unless told, ``imap``)."""

    name = "mp"

    def _start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(self.workers)
        self.chunksize = self.options.get("chunksize")

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return self.pool.map(fn, items, chunksize=self.chunksize)

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.imap(fn, items, chunksize=self.chunksize or 1)

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        import multiprocessing

        if self.how == "imap":  # chunksize 1: an item's exception comes out of next(), in order
            return self._collect_imap(fn, items, deadline)
        pending = self.pool.map_async(fn, items, chunksize=self.chunksize)
        try:
            return Collected(values=dict(enumerate(pending.get(deadline))))
        except multiprocessing.TimeoutError:
            return Collected(hung=True)
        except Exception as exc:
            return Collected(raised=describe_exception(exc))

    def _collect_imap(self, fn: Callable[[Any], Any], items: list[Any],
                      deadline: float | None) -> Collected:
        import multiprocessing

        results = self.pool.imap(fn, items, chunksize=1)
        out = Collected()
        end = None if deadline is None else time.monotonic() + deadline
        for i in range(len(items)):
            try:
                out.values[i] = results.next(None if end is None else max(0.0, end - time.monotonic()))
            except multiprocessing.TimeoutError:
                out.hung = True
                break
            except Exception as exc:
                out.errors[i] = type(exc).__name__
        return out

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def terminate(self) -> None:
        # After a worker died mid-task, Pool.join() waits forever for the lost task: terminate.
        self.pool.terminate()
        self.pool.join()

    def describe(self) -> dict[str, Any]:
        import multiprocessing

        return {**super().describe(), "start_method": multiprocessing.get_start_method()}


class LokyPeer(_ExecutorPeer):
    """loky's ``get_reusable_executor().map``."""

    name = "loky"

    def _start(self) -> None:
        from loky import get_reusable_executor

        self.pool = get_reusable_executor(max_workers=self.workers)
        self.chunksize = int(self.options.get("chunksize", 1))


class JoblibPeer(Peer):
    """joblib ``Parallel(n_jobs, batch_size="auto")`` kept open (its loky backend is reused)."""

    name = "joblib"

    def _start(self) -> None:
        from joblib import Parallel

        self.parallel = Parallel(n_jobs=self.workers,
                                 batch_size=self.options.get("batch_size", "auto"))
        self.parallel.__enter__()

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        from joblib import delayed

        return list(self.parallel(delayed(fn)(x) for x in items))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        # return_as="generator": results in order as they come, the input dispatched lazily
        # (pre_dispatch); the same loky executor as map, and its default memmapping of inputs.
        from joblib import Parallel, delayed

        gen = Parallel(n_jobs=self.workers, batch_size=self.options.get("batch_size", "auto"),
                       return_as="generator")
        return gen(delayed(fn)(x) for x in items)  # type: ignore[no-any-return]

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        return one_call(lambda: self.map(fn, items))

    def close(self) -> None:
        self.parallel.__exit__(None, None, None)
        # Leaving Parallel keeps its loky workers alive for reuse (idle timeout 300 s), and in the
        # harness's subprocess they kept the interpreter from exiting. joblib has no public call to
        # stop them; this is the executor the loky backend shares.
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)


def _single_args(items: Any) -> Any:
    """mpire unpacks a tuple (or dict) item into arguments; wrap such items so the function gets
    the item itself. Other inputs are passed through untouched (their length stays visible)."""
    if isinstance(items, list) and any(isinstance(x, tuple | dict) for x in items):
        return [(x,) for x in items]
    return items


class MpirePeer(Peer):
    """mpire ``WorkerPool(n_jobs, keep_alive=True).map`` (its default chunking)."""

    name = "mpire"

    def _start(self) -> None:
        from mpire import WorkerPool

        self.pool = WorkerPool(n_jobs=self.workers, keep_alive=True)

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, _single_args(items), chunk_size=self.options.get("chunksize")))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.imap(fn, _single_args(items),  # type: ignore[no-any-return]
                              chunk_size=self.options.get("chunksize"))

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        return one_call(lambda: self.map(fn, items))

    def close(self) -> None:
        self.pool.stop_and_join()

    def terminate(self) -> None:
        self.pool.terminate()


class PebblePeer(Peer):
    """pebble ``ProcessPool.map(chunksize=...)``."""

    name = "pebble"

    def _start(self) -> None:
        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=self.workers)
        self.chunksize = int(self.options.get("chunksize", 1))

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=self.chunksize).result())

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=self.chunksize).result()  # type: ignore[no-any-return]

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        if self.how == "schedule":  # one future per task: a dead worker expires only its task
            return gather_futures([self.pool.schedule(fn, args=(x,)) for x in items], deadline)
        # map's result iterator raises each failed item's error from next() and goes on
        return drain(self.pool.map(fn, items, chunksize=self.chunksize).result(), continues=True)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def terminate(self) -> None:
        self.pool.stop()
        self.pool.join()


class StagepoolPeer(Peer):
    """``stagepool.Engine(workers, chunk_size="auto")``: ``map(...).values`` and ``imap``.

    Options ``chunk_size``, ``shm_threshold``, ``max_in_flight``, ``timeout``, ``backend`` and
    ``address`` go to the Engine as given (a cluster at an ``address`` brings its own workers: no
    ``workers=``). ``import_distributed``: import dask.distributed first, as a process that also
    uses a cluster would (it fills ``copyreg.dispatch_table``, which picklers that copy it pay
    for per message). ``cost`` (any true value) makes ``map`` pass ``cost=float``: each item is
    its own cost.
    """

    name = "stagepool"
    ENGINE_OPTIONS = ("chunk_size", "shm_threshold", "max_in_flight", "timeout", "backend",
                      "address")
    BACKEND = "local"

    def _start(self) -> None:
        import stagepool as sp

        if self.options.get("import_distributed"):
            import distributed  # noqa: F401  (its import is the point of the row)
        options: dict[str, Any] = {"chunk_size": "auto", "backend": self.BACKEND, **{
            k: v for k, v in self.options.items() if k in self.ENGINE_OPTIONS}}
        if options.get("address") is None:
            options.pop("address", None)
            options["workers"] = self.workers
        self.engine = sp.Engine(**options)
        self._stats: dict[str, Any] = {}

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        # options={"cost": "item"}: each item is its own cost (a number: seconds of work)
        report = self.engine.map(fn, items, cost=float if self.options.get("cost") else None)
        values = report.values
        if report.failed:
            raise RuntimeError(f"stagepool reported failures:\n{report.summary()}")
        s = report.stats
        self._stats = {"chunks": s.chunks, "mean_chunk": s.chunk_size,
                       "sp_wall_s": s.wall_time, "sp_busy_s": s.busy_time,
                       "sp_efficiency": s.parallel_efficiency}
        return values

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        outcomes = self.engine.imap(fn, items, ordered=True)
        try:
            for outcome in outcomes:
                yield outcome.unwrap()
        finally:
            outcomes.close()  # type: ignore[attr-defined]

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        report = self.engine.map(fn, items)  # one call, one outcome per item, never raises
        out = Collected()
        for outcome in report:
            if outcome.ok:
                out.values[outcome.index] = outcome.value
            else:
                out.errors[outcome.index] = type(outcome.error).__name__
        return out

    def executor(self) -> concurrent.futures.Executor:
        return self.engine.executor

    def run_extra(self) -> dict[str, Any]:
        return dict(self._stats)

    def close(self) -> None:
        self.engine.shutdown(wait=True)

    def terminate(self) -> None:
        self.engine.shutdown(wait=True, kill=True)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "worker_pids": self.engine.worker_pids(),
                "plan": self.engine.plan.reason}


class CeilingPeer(Peer):
    """The hardware ceiling: the items split in advance over ``workers`` plain
    ``multiprocessing.Process``es (no pool, no queue, no chunking, forked when the platform can),
    balanced by weight: each item must be a number proportional to its work (cpu: iterations,
    uneven: seconds), see ``suite.balanced_split``.

    Reports its own ``seconds`` (via ``run_extra``, which the harness applies over the workload's
    timing): from releasing the started, waiting processes to the last result. Process start-up is
    left out, so this is the best any pool of that many processes could do on this machine.
    """

    name = "ceiling"

    def start(self) -> None:  # nothing to start: every map starts its own processes
        self._seconds: float | None = None

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        import multiprocessing

        from .suite import balanced_split

        # fork is fastest, but forking a process with threads (dask's client, a sampler) risks
        # inheriting a held lock: then spawn (run_share imports numpy before the gate opens).
        forkable = "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context(
            "fork" if forkable and threading.active_count() == 1 else "spawn")
        groups = [g for g in balanced_split([float(x) for x in items], self.workers) if g]
        gate = ctx.Barrier(len(groups) + 1)
        pipes = [ctx.Pipe(duplex=False) for _ in groups]
        procs = [ctx.Process(target=workloads.run_share, args=(fn, [(i, items[i]) for i in g],
                                                                 gate, send))
                 for g, (_, send) in zip(groups, pipes, strict=True)]
        for proc in procs:
            proc.start()
        gate.wait()
        began = time.perf_counter()
        values: list[Any] = [None] * len(items)
        for receive, _ in pipes:
            for i, value in receive.recv():
                values[i] = value
        self._seconds = time.perf_counter() - began
        for proc in procs:
            proc.join()
        return values

    def run_extra(self) -> dict[str, Any]:
        return {} if self._seconds is None else {"seconds": self._seconds}


# The cluster peers build on the adapters above, so they are imported here, at the end (and only
# through this module: importing cluster_peers first would find this one half made).
from .cluster_peers import DaskPeer, JoblibDaskPeer, StagepoolDaskPeer  # noqa: E402

PEERS: dict[str, type[Peer]] = {cls.name: cls for cls in (
    SerialPeer, CeilingPeer, PPEPeer, MpPoolPeer, LokyPeer, JoblibPeer, MpirePeer, PebblePeer,
    DaskPeer, JoblibDaskPeer, StagepoolPeer, StagepoolDaskPeer)}


def make_peer(spec: PeerSpec, workers: int) -> Peer:
    if spec.peer not in PEERS:
        raise ValueError(f"unknown peer {spec.peer!r}; known: {', '.join(PEERS)}")
    return PEERS[spec.peer](1 if spec.peer == "serial" else workers, **spec.options)
