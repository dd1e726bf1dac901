"""The engine: turns items into chunks, keeps a bounded number in flight, and gives every item
exactly one outcome, whatever happens to the workers.

Data flow of one batch (``map``, ``imap``, ``map_async`` all run this in the caller's thread, or a
helper thread for async callers; never in the event loop):

    items (list, iterator) --islice--> chunk (start index, items)           _Batch._fill
        | ChunkSizer picks the size ("auto": learns per-item time, shrinks at the tail)
        | pickled HERE (a chunk that will not pickle is split to find the culprit item)
        v
    backend.submit(Task)   at most max_in_flight tasks of this batch at once (backpressure)
        | pool thread -> worker: run_chunk(fn, items) -> result bytes / LaneDied / Cancelled
        v
    Task.on_done --> this batch's queue --> _Batch._absorb
        | ok values       -> one "run" piece (values, durations, pid) for the whole chunk
        | item errors     -> Failure pieces (retried first if retry_on says so)
        | worker died     -> Failure for the one item it was running; the rest re-dispatched
        v
    ReportBuilder (map: columnar, no per-item objects)  or  Outcome stream (imap: ordered or not)

Nothing is dropped or duplicated: each submitted index is tracked until it has a final piece.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import os
import pickle
import queue
import signal
import threading
import time
from array import array
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from . import _transport
from ._backends import Backend, Cancelled, Group, LaneDied, Task, TaskResult
from ._chunking import ChunkSizer, validate_chunk_size
from ._config import DEFAULT, EngineConfig, Timeout, check_timeout
from ._errors import (
    EngineClosed,
    RemoteError,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    WorkerCrashed,
)
from ._outcome import (
    BatchReport,
    BatchStats,
    Failure,
    Kind,
    Outcome,
    RemoteTraceback,
    ReportBuilder,
    make_outcome,
)
from ._progress import Progress, ProgressSink, make_sink
from ._resources import WorkerPlan, plan_workers

if TYPE_CHECKING:
    from ._aio import OutcomeStream
from ._worker import ChunkResult, ErrInfo, apply_call, dumps, star_call

__all__ = ["Engine"]

T = TypeVar("T")
R = TypeVar("R")


# Chunks of one batch in flight at once, per worker. Two keeps every worker fed while a result
# travels back; more only holds memory (and makes other batches wait longer for their turn).
IN_FLIGHT_PER_WORKER = 2
# glibc returns every freed block above its (adaptive) mmap threshold to the kernel, so a stage
# that allocates ~14 MiB of temporaries per item page-faults all of it again on every item: the
# demo stage measured 22 ms per item in a fresh worker and 14.5 ms with these settings (the
# profiler's finding). Up to 64 MiB of freed heap stays in each worker. A user's own setting wins.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                     "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}
# How long the batch loop sleeps at most when waiting, so Ctrl-C and retry back-off are noticed.
WAIT_SLICE = 0.2

# A piece of a batch's final outcomes: a run of consecutive results from one chunk, or one failure.
# ("run", start, values, durations, pid, attempts, skip)  /  ("fail", index, Failure)
Piece = tuple[Any, ...]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


_CRASH_HINTS = {
    "SIGKILL": "SIGKILL: usually the OOM killer; lower mem_per_task or workers",
    "SIGSEGV": "a segmentation fault, usually a bug in a native extension",
    "SIGBUS": "a bus error, usually a native extension or a truncated memory-mapped file",
    "SIGABRT": "abort(), usually a failed assertion in a native library",
    "SIGTERM": "SIGTERM from outside the engine",
    "SIGFPE": "a floating-point exception in native code",
    "SIGILL": "an illegal instruction in native code",
}


def crash_error(died: LaneDied, index: int, stage: str) -> WorkerCrashed:
    """A message that says who died, how, on which item, the likely cause and the stderr tail."""
    code = died.exitcode
    if died.reason == "memory":
        how = "was killed by stagepool: its memory passed twice max_rss_per_worker"
        hint = "the item needs more memory than allowed; raise max_rss_per_worker or split it"
    elif code is not None and code < 0:
        how = f"was killed by {_signal_name(-code)}"
        hint = _CRASH_HINTS.get(_signal_name(-code), "an unexpected signal")
    elif code is not None:
        how = f"exited with code {code}"
        hint = "the task (or a library it called) ended the process, e.g. with os._exit()"
    else:
        how, hint = "died", "unknown cause"
    if died.reason == "initializer":  # the backend starts no new worker: a doomed engine
        stage = f"running the initializer {died.initializer}, before"
        hint += "; no worker is started again and every item fails so: fix the initializer"
    msg = f"worker {died.pid} {how} while {stage} item {index}: {hint}"
    if died.detail:  # the backend keeps only the last lines of the worker's stderr
        msg += f"\n--- the worker's last words (stderr tail) ---\n{died.detail}"
    return WorkerCrashed(msg)


def death_failure(died: LaneDied, index: int, stage: str,
                  seconds: float) -> tuple[Kind, BaseException]:
    """What a dead worker means for the item it was running (``seconds``: its timeout)."""
    if died.reason == "timeout":
        return "timeout", TaskTimeout(
            f"item {index} ran longer than its timeout of {seconds:g} s in worker {died.pid}; "
            "the worker and its child processes were killed and replaced")
    if died.reason == "cancelled":
        return "cancelled", TaskCancelled(
            f"item {index} was running when its batch was cancelled; its worker was killed")
    return "crash", crash_error(died, index, stage)


def _retryable(retry_on: tuple[str | type[BaseException], ...], kind: Kind,
               error: BaseException) -> bool:
    """Whether ``retry_on`` names the failure's kind or one of its exception's types."""
    return any(entry == kind or (isinstance(entry, type) and isinstance(error, entry))
               for entry in retry_on)


def _rebuild_error(info: ErrInfo, index: int) -> tuple[Kind, BaseException, str]:
    kind, blob, type_name, message, tb = info
    if kind == "serialization":
        return "serialization", SerializationError(f"item {index}: {message}"), tb
    error: BaseException | None = None
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except BaseException:
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(f"{type_name}: {message}", type_name=type_name, remote_traceback=tb)
    error.__cause__ = RemoteTraceback(tb)
    return ("error" if kind == "error" else "serialization"), error, tb


class _FnRegistry:
    """Pickles each function once and gives it a key, so workers unpickle it once too."""

    def __init__(self) -> None:
        self._keys: dict[bytes, int] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, fn: Callable[..., Any]) -> tuple[int, bytes]:
        blob = dumps(fn)
        with self._lock:
            key = self._keys.get(blob)
            if key is None:
                if len(self._keys) > 256:
                    self._keys.clear()
                key = self._keys[blob] = next(self._counter)
        return key, blob


class _Batch:
    """One call's worth of work: feeds chunks with backpressure, turns answers into pieces."""

    def __init__(
        self,
        engine: Engine,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        total: int | None,
        *,
        chunk_size: int | None,
        timeout: Timeout,
        sink: ProgressSink | None,
        max_in_flight: int | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        self.engine = engine
        self.backend = engine._backend_or_raise()
        cfg = engine.config
        self.total = total  # None for an iterator of unknown length
        self.it = iter(items)
        self.group = Group()
        self.answers: queue.SimpleQueue[tuple[Task | None, TaskResult | None]] = queue.SimpleQueue()
        # Orders _on_done against cancel(). Re-entrant: cancel() also runs from the finalizer of
        # an abandoned generator, which the garbage collector may start inside _on_done.
        self.lock = threading.RLock()
        self.outbox: list[Task] = []  # encoded chunks _fill hands to the backend in one go
        _transport.open_arena(id(self.group))
        self.sizer = ChunkSizer(chunk_size if chunk_size is not None else cfg.chunk_size,
                                self.backend.workers, self.total)
        self.timeout, self.retries, self.retry_on = timeout, cfg.retries, cfg.retry_on
        self.backoff = cfg.backoff
        self.max_in_flight = max_in_flight or cfg.max_in_flight or (
            IN_FLIGHT_PER_WORKER * self.backend.workers + 1)
        self.sink = sink
        self.max_concurrent = max_concurrent  # items of this batch in workers at once
        self.items_out = 0
        self.fn = fn
        try:
            self.fn_key, self.fn_blob = engine._fns.register(fn)
            self.fn_error: BaseException | None = None
        except BaseException as exc:
            self.fn_key, self.fn_blob, self.fn_error = 0, b"", exc
        self.next_index = 0
        self.exhausted = False
        self.source_error: BaseException | None = None
        self.in_flight: dict[int, tuple[int, list[Any], int]] = {}  # task id -> start, items, tries
        self.again: collections.deque[tuple[float, int, list[Any], int]] = collections.deque()
        self.ready: list[Piece] = []
        # Ordered streaming: outcomes held for reordering count against the window too, or one
        # slow chunk would let the others run ahead without bound. ``emitted`` is set by the
        # consumer; ``window`` holds the starts of source chunks not yet fully emitted.
        self.ordered = False
        self.emitted = 0
        self.window: collections.deque[int] = collections.deque()
        self.done = self.failed = self.chunks = self.retried = 0
        self.busy = 0.0
        self.started = time.perf_counter()

    # ---- feeding -----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Take and encode chunks up to the window, then hand them to the backend together."""
        try:
            self._fill_outbox()
        finally:
            self._flush()

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, []
        if not outbox:
            return
        try:
            self.backend.submit_many(outbox)
        except EngineClosed:
            for task in outbox:
                _transport.discard(task.items_blob)
                start, items, tries = self.in_flight.pop(task.id)
                self.items_out -= len(items)
                self._cancel_rest(start, items, tries)

    def _fill_outbox(self) -> None:
        while len(self.in_flight) < self.max_in_flight:
            if self.again and self.again[0][0] <= time.monotonic():
                if self._room() < len(self.again[0][2]):
                    return
                _, start, items, tries = self.again.popleft()
                self._submit(start, items, tries)
            elif not self.exhausted and self._window_open() and self._room() > 0:
                self._take()
            else:
                return

    def _room(self) -> int:
        """How many more items ``max_concurrent`` lets into the workers now."""
        if self.max_concurrent is None:
            return 1 << 30
        return self.max_concurrent - self.items_out

    def _window_open(self) -> bool:
        if not self.ordered:
            return True
        window = self.window
        while len(window) > 1 and window[1] <= self.emitted:
            window.popleft()
        if window and self.emitted >= self.next_index:
            window.clear()
        return len(window) < self.max_in_flight

    def _take(self) -> None:
        size = min(self.sizer.next_size(self.next_index), self._room())
        chunk: list[Any] = []
        try:
            chunk.extend(itertools.islice(self.it, size))
        except BaseException as exc:  # the caller's generator failed: finish what was taken
            self.source_error = exc
        if len(chunk) < size:  # list.extend keeps what the iterator gave before it raised
            self.exhausted = True
        if chunk:
            start, self.next_index = self.next_index, self.next_index + len(chunk)
            if self.ordered:
                self.window.append(start)
            self._submit(start, chunk, 1)

    def _submit(self, start: int, items: list[Any], tries: int) -> None:
        if self.fn_error is not None:
            for i in range(len(items)):
                self._final_failure(start + i, "serialization", SerializationError(
                    f"item {start + i}: the function {self.fn!r} cannot be pickled: "
                    f"{type(self.fn_error).__name__}: {self.fn_error}"), tries)
            return
        try:
            blob, payload = self.engine._encode(items, id(self.group))
        except BaseException:
            self._submit_isolating(start, items, tries)
            return
        self.sizer.observe_payload(len(items), payload)
        timeouts = self._timeouts(start, items)
        if isinstance(timeouts, BaseException):
            _transport.discard(blob)
            for i in range(len(items)):
                self._final_failure(start + i, "error", timeouts, tries)
            return
        if payload > len(blob):  # big arrays went to shared memory: keep them only there
            items = self._views(blob, items)
        task = Task(self.group, self.fn_key, self.fn_blob, blob, len(items), self._on_done,
                    timeouts, self.sizer.expected_seconds(len(items)),
                    self.sizer.per_item_clock())
        self.outbox.append(task)
        self.in_flight[task.id] = (start, items, tries)
        self.items_out += len(items)

    @staticmethod
    def _views(blob: bytes, items: list[Any]) -> list[Any]:
        """The chunk's items again, their big arrays as lazy read-only views of the segments just
        written: the batch keeps what it may send again (a crash's innocents, a retry) without
        holding every input twice (segment + the caller's array, which can now be freed). The
        views stay valid even when a worker unlinks a segment it keeps."""
        try:
            return cast(list[Any], _transport.loads(blob, unlink=False, lazy=True))
        except Exception:  # out of address space, say: keep the originals instead
            return items

    def _cancel_rest(self, start: int, items: list[Any], tries: int) -> None:
        """The engine shut down under this batch: what never ran is cancelled, not lost.

        For a sized input the items not yet taken get their cancelled outcome too; an iterator
        of unknown length simply stops being read."""
        runs = [(start, items)]
        if self.total is not None and not self.exhausted:
            rest = list(self.it)
            runs.append((self.next_index, rest))
            self.next_index += len(rest)
        self.exhausted = True
        for first, run in runs:
            for i in range(len(run)):
                self._final_failure(first + i, "cancelled", TaskCancelled(
                    f"item {first + i} was cancelled before it ran: the engine was shut down"),
                    tries)

    def _submit_isolating(self, start: int, items: list[Any], tries: int) -> None:
        """The chunk would not pickle: fail exactly the items that do not, send the others."""
        run: list[Any] = []
        for i, item in enumerate(items):
            try:
                dumps(item)
            except BaseException as exc:
                if run:
                    self._submit(start + i - len(run), run, tries)
                    run = []
                self._final_failure(start + i, "serialization", SerializationError(
                    f"item {start + i}: the argument ({type(item).__module__}."
                    f"{type(item).__qualname__}) cannot be pickled: {type(exc).__name__}: {exc}"),
                    tries)
            else:
                run.append(item)
        if run:
            self._submit(start + len(items) - len(run), run, tries)

    def _timeouts(self, start: int, items: list[Any]) -> tuple[float, ...] | BaseException | None:
        if self.timeout is None:
            return None
        if not callable(self.timeout):
            return (self.timeout,) * len(items)
        out = []
        for i, item in enumerate(items):
            try:
                value = check_timeout(self.timeout(item), f"timeout({start + i})")
            except BaseException as exc:
                return exc
            out.append(float(value) if value is not None else float("inf"))  # type: ignore[arg-type]
        return tuple(out)

    def _on_done(self, task: Task, result: TaskResult) -> None:
        # Runs in the pool thread: hand over, nothing more. A batch that was abandoned will never
        # read its answers, so their shared-memory arrays are freed here instead.
        with self.lock:
            if not self.group.cancelled:
                self.answers.put((task, result))
                return
        _transport.discard(task.items_blob)
        if isinstance(result, bytes):
            _transport.discard(result)

    # ---- absorbing answers ---------------------------------------------------------------------

    def _absorb(self, task: Task | None, result: TaskResult | None) -> None:
        if task is None or result is None:  # the wake-up of abandon()
            return
        again = len(self.again)
        try:
            self._absorb_answer(task, result)
        finally:
            # The inputs' segments: reused by the next chunks, unless some of these items go out
            # again (a crash's innocents, a retry, a split), whose views must keep their data.
            if len(self.again) == again:
                _transport.recycle(task.items_blob, id(self.group))
            else:
                _transport.discard(task.items_blob)

    def _absorb_answer(self, task: Task, result: TaskResult) -> None:
        entry = self.in_flight.pop(task.id, None)
        if entry is None:
            return
        start, items, tries = entry
        self.items_out -= len(items)
        self.chunks += 1
        if isinstance(result, bytes):
            self._absorb_bytes(start, items, tries, result)
        elif isinstance(result, LaneDied):
            self._absorb_death(start, items, tries, result)
        else:
            for i in range(len(items)):
                self._final_failure(start + i, "cancelled", TaskCancelled(
                    f"item {start + i} was cancelled before it ran: {result.reason}"), tries)

    def _absorb_bytes(self, start: int, items: list[Any], tries: int, blob: bytes) -> None:
        try:
            values, stamps, errors, pid, _rss = cast(
                ChunkResult, _transport.loads(blob, writable=True, unlink=True))
        except BaseException as exc:
            if len(items) > 1:
                self._split(start, items, tries)
                return
            self._final_failure(start, "serialization", SerializationError(
                f"item {start}: its result could not be unpickled in the parent: "
                f"{type(exc).__name__}: {exc}"), tries)
            return
        durations, busy = _durations(stamps, len(values))
        self.busy += busy
        self.sizer.observe(len(values), busy)
        skip: set[int] = set()
        if errors:
            if any(info[0] == "unpickle" for info in errors.values()):
                self._absorb_unpickle(start, items, tries, errors)
                return
            for offset, info in errors.items():
                skip.add(offset)
                kind, error, tb = _rebuild_error(info, start + offset)
                self._failure_or_retry(start + offset, items[offset], kind, error, tries, tb,
                                       durations[offset], pid)
        self.ready.append(("run", start, values, durations, pid, tries, skip))
        self.done += len(values) - len(skip)

    def _absorb_unpickle(self, start: int, items: list[Any], tries: int,
                         errors: dict[int, ErrInfo]) -> None:
        if len(items) > 1:
            self._split(start, items, tries)
            return
        info = errors[0]
        self._final_failure(start, "serialization", SerializationError(
            f"item {start}: {info[3]}"), tries, info[4])

    def _absorb_death(self, start: int, items: list[Any], tries: int, died: LaneDied) -> None:
        if died.offset < 0:  # died decoding or encoding: find the item by sending them singly
            if len(items) > 1:
                self._split(start, items, tries)
                return
            stage = "unpickling or pickling the data of"
            offset = 0
        else:
            stage, offset = "running", died.offset
        index = start + offset
        limit = self._timeouts(index, [items[offset]]) if died.reason == "timeout" else None
        seconds = limit[0] if isinstance(limit, tuple) else float("nan")
        kind, error = death_failure(died, index, stage, seconds)
        self._failure_or_retry(index, items[offset], kind, error, tries, None, 0.0, died.pid)
        # The innocent: what ran before (results lost with the worker) and what had not started.
        if offset > 0:
            self.again.appendleft((0.0, start, items[:offset], tries))
        if offset + 1 < len(items):
            self.again.appendleft((0.0, index + 1, items[offset + 1:], tries))

    def _split(self, start: int, items: list[Any], tries: int) -> None:
        for i in reversed(range(len(items))):
            self.again.appendleft((0.0, start + i, [items[i]], tries))

    def _failure_or_retry(self, index: int, item: Any, kind: Kind, error: BaseException,
                          tries: int, tb: str | None, duration: float, pid: int | None) -> None:
        if tries <= self.retries and _retryable(self.retry_on, kind, error):
            self.retried += 1
            delay = self.backoff * 2 ** (tries - 1)
            self.again.append((time.monotonic() + delay, index, [item], tries + 1))
            return
        self._final_failure(index, kind, error, tries, tb, duration, pid)


    def _final_failure(self, index: int, kind: Kind, error: BaseException, tries: int,
                       tb: str | None = None, duration: float = 0.0,
                       pid: int | None = None) -> None:
        self.ready.append(("fail", index, Failure(kind, error, tb, duration, pid, tries)))
        self.failed += 1
        self.done += 1

    # ---- the loop --------------------------------------------------------------------------------

    def pieces(self) -> Iterator[Piece]:
        """Yield final pieces until every taken item has one; cancel leftovers on exit."""
        finished = False
        try:
            while not self.group.cancelled:  # abandon() from another thread ends the loop
                self._fill()
                if self.ready:
                    yield from self._drain_ready()
                    continue
                if not self.in_flight:
                    if self.exhausted and not self.again:
                        finished = True
                        return
                    time.sleep(min(WAIT_SLICE, max(0.0, self.again[0][0] - time.monotonic()))
                               if self.again else 0)
                    continue
                self._wait_answer()
        finally:
            if not finished:
                self.cancel(kill_running=False)
            _transport.close_arena(id(self.group))
            if self.sink is not None:
                self.sink.close()

    def _drain_ready(self) -> Iterator[Piece]:
        ready, self.ready = self.ready, []
        yield from ready
        if self.sink is not None:
            self.sink.update(self.done, self.failed)

    def _wait_answer(self) -> None:
        wait = WAIT_SLICE
        if self.again:
            wait = min(wait, max(0.0, self.again[0][0] - time.monotonic()))
        try:
            task, result = self.answers.get(timeout=wait)
        except queue.Empty:
            return
        self._absorb(task, result)
        while True:  # take every answer already there before refilling
            try:
                task, result = self.answers.get_nowait()
            except queue.Empty:
                return
            self._absorb(task, result)

    def _withdraw(self, kill_running: bool) -> None:
        with self.lock:  # from here on _on_done frees answers instead of queueing them
            self.group.cancelled = True
        self.backend.withdraw(self.group, kill_running=kill_running)

    def abandon(self, *, kill_running: bool) -> None:
        """From any thread, never blocks: the batch stops taking items and sending chunks,
        queued chunks are withdrawn, running ones are killed (``kill_running``) or finish
        unobserved, and the thread running :meth:`pieces` leaves it at once."""
        self._withdraw(kill_running)
        self.answers.put((None, None))  # wake the batch thread if it waits for an answer

    def cancel(self, *, kill_running: bool) -> None:
        """In the batch's own thread: withdraw as :meth:`abandon` does, stop taking items, and
        free the answers already queued (they will never be read)."""
        self.exhausted = True
        self.again.clear()
        self._withdraw(kill_running)
        while True:  # answers that arrived but will never be read
            try:
                task, result = self.answers.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                _transport.discard(task.items_blob)
            if isinstance(result, bytes):
                _transport.discard(result)

    def stats(self) -> BatchStats:
        wall = time.perf_counter() - self.started
        n = self.next_index
        return BatchStats(items=n, wall_time=wall, busy_time=self.busy,
                          workers=self.backend.workers, chunks=self.chunks,
                          chunk_size=n / self.chunks if self.chunks else 0.0,
                          retries=self.retried)


def _durations(stamps: array[float], n: int) -> tuple[array[float], float]:
    """Per-item durations from the worker's timestamps (n + 1 of them, or start and end only)."""
    busy = stamps[-1] - stamps[0] if len(stamps) >= 2 else 0.0
    if len(stamps) == n + 1:
        return array("d", np.diff(np.frombuffer(stamps, dtype=np.float64)).tobytes()), busy
    return array("d", [busy / n if n else 0.0]) * n, busy


def _run_to_report(batch: _Batch) -> BatchReport[Any]:
    builder = ReportBuilder(batch.total or 0)
    try:
        for piece in batch.pieces():
            if piece[0] == "run":
                _, start, values, durations, pid, tries, _skip = piece
                builder.place(start, values, durations, pid, tries)
            else:
                builder.fail(piece[1], piece[2])
    except KeyboardInterrupt:
        batch.cancel(kill_running=True)
        raise
    report = builder.build(batch.next_index, batch.stats())
    if batch.source_error is not None:
        error = batch.source_error
        error.report = report  # type: ignore[attr-defined]
        error.add_note(f"stagepool: the items iterable raised after {batch.next_index} items; "
                       "the partial report is attached as .report")
        raise error
    return report


def _outcomes(batch: _Batch, ordered: bool) -> Iterator[Outcome[Any]]:
    pending: dict[int, Outcome[Any]] = {}
    batch.ordered = ordered
    for piece in batch.pieces():
        fresh = _piece_outcomes(piece)
        if not ordered:
            yield from fresh
            continue
        for outcome in fresh:
            if not pending and outcome.index == batch.emitted:  # in order already: no buffering
                batch.emitted += 1
                yield outcome
            else:
                pending[outcome.index] = outcome
        while batch.emitted in pending:
            outcome = pending.pop(batch.emitted)
            batch.emitted += 1
            yield outcome
    if batch.source_error is not None:
        raise batch.source_error


def _piece_outcomes(piece: Piece) -> list[Outcome[Any]]:
    if piece[0] == "fail":
        f: Failure = piece[2]
        return [make_outcome((piece[1], False, None, f.error, f.kind, f.traceback, f.duration,
                              f.worker, f.attempts))]
    _, start, values, durations, pid, tries, skip = piece
    if not skip:
        return [make_outcome((start + offset, True, value, None, "ok", None, duration, pid, tries))
                for offset, (value, duration) in enumerate(zip(values, durations, strict=True))]
    return [make_outcome((start + offset, True, value, None, "ok", None, durations[offset], pid,
                          tries))
            for offset, value in enumerate(values) if offset not in skip]


class Engine:
    """A pool of worker processes that gives every item exactly one :class:`Outcome`.

    ``workers="auto"`` asks :func:`plan_workers` (CPUs, affinity, cgroup quota, memory per task);
    ``engine.plan`` says what it chose and why. The workers start here, once, and serve every
    batch until :meth:`shutdown` (or the end of a ``with`` block).

    All options are keyword-only and validated here: a bad value raises ``TypeError`` or
    ``ValueError`` naming the argument, before any process starts.

    Failure handling: an item that raises, times out, crashes its worker or cannot be pickled
    fails alone, as an outcome; the engine keeps serving. ``retries`` re-runs failed items whose
    kind or exception type is in ``retry_on`` (default: errors, crashes, timeouts), after
    ``backoff * 2**(attempt - 1)`` seconds.

    Options (sizes take ints in bytes or strings such as ``"512MiB"``):

    * ``workers``, ``mem_per_task``: how many processes; "auto" plans from the machine and the
      memory each task needs (see :func:`plan_workers`).
    * ``chunk_size``: items per message to a worker; "auto" learns it (about 20 ms of work per
      chunk, at most 4 MiB of payload, a single item first). ``max_in_flight``: chunks of one batch
      submitted and not yet consumed (default 2 per worker + 1); with ``imap`` on an endless
      iterator this is the memory bound.
    * ``timeout`` (seconds, or a function of the item), ``retries``, ``retry_on``, ``backoff``.
    * ``max_rss_per_worker``, ``max_tasks_per_worker``: recycle a worker that grew past a size or
      ran that many items; a runaway allocation becomes that item's ``MemoryError``.
    * ``initializer(*initargs)`` runs once in each worker; if it raises, every item sent to that
      worker fails with :class:`InitializerError`; if it kills the worker (segfault,
      ``os._exit``), no worker is started again and every item fails with :class:`WorkerCrashed`
      naming the initializer.
    * ``shm_threshold``: numpy arrays this big (default 1 MiB; 0 disables) travel through
      ``/dev/shm`` in both directions. Workers see read-only views of their inputs
      (``writable_inputs=True``: private copy-on-write views); results arrive as ordinary
      writable arrays whose memory is freed when the caller drops them.
    * ``progress``: a tqdm bar per batch.
    """

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
        retry_on: Any = ("error", "crash", "timeout"),
        backoff: float = 0.0,
        max_rss_per_worker: int | str | None = None,
        max_tasks_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        shm_threshold: int | str = "1MiB",
        writable_inputs: bool = False,
    ) -> None:
        self.config = EngineConfig.create(
            shm_threshold=shm_threshold, writable_inputs=writable_inputs,
            workers=workers, mem_per_task=mem_per_task, chunk_size=chunk_size,
            max_in_flight=max_in_flight, progress=progress, timeout=timeout, retries=retries,
            retry_on=retry_on, backoff=backoff, max_rss_per_worker=max_rss_per_worker,
            max_tasks_per_worker=max_tasks_per_worker, initializer=initializer, initargs=initargs)
        self.plan: WorkerPlan = plan_workers(mem_per_task=self.config.mem_per_task,
                                             max_workers=self.config.workers)
        if self.config.workers is not None and self.plan.limited_by != "env":
            self.workers = self.config.workers
        else:
            self.workers = self.plan.workers
        # The array size that goes through shared memory (0 where there is no /dev/shm); checked
        # once, not per chunk.
        self._shm_threshold = self.config.shm_threshold if _transport.available() else 0
        self._fns = _FnRegistry()
        self._apply = self._fns.register(apply_call)  # the item function of every submit()
        self._submit_group = Group()  # every submit() call, served in order, shared fairly
        # Recent duration of a submit() of each function (seconds, smoothed): what lets a worker
        # take the next short call before it answers the current one (see _Single._send).
        self._submit_seconds: dict[Any, float] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()  # a forked child inherits the engine, not its workers
        self._backend: Backend | None = self._start_backend()
        self._executor: _ExecutorView | None = None

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str], **overrides: Any) -> Engine:
        """An engine with the settings ``stagepool profile --out DIR`` recommended: ``path`` is
        its ``profile.json`` or DIR; keyword ``overrides`` win over the file. Raises ``ValueError``
        for a file that is not a stagepool profile."""
        from ._profiling import load_profile  # the profiler's layer, imported only when used

        return cls(**{**load_profile(path), **overrides})

    def _start_backend(self) -> Backend:
        from ._backends._loky import LokyBackend

        env = self.plan.thread_env(workers=self.workers)
        for name, value in WORKER_MALLOC_ENV.items():
            if name not in os.environ:
                env[name] = value
        return LokyBackend(
            self.workers, initializer=self.config.initializer, initargs=self.config.initargs,
            env=env, max_rss=self.config.max_rss_per_worker,
            max_tasks=self.config.max_tasks_per_worker, shm_threshold=self._shm_threshold,
            writable_inputs=self.config.writable_inputs)

    def _encode(self, obj: Any, arena: int | None = None) -> tuple[bytes, int]:
        """Pickle work for the workers; big arrays go to shared memory (see _transport), reusing
        the segments of the batch's answered chunks (``arena``) where the sizes match."""
        return _transport.dumps_sized(obj, threshold=self._shm_threshold, owner=os.getpid(),
                                      creator="p", arena=arena)

    def _backend_or_raise(self) -> Backend:
        backend = self._backend
        if backend is None:
            raise EngineClosed("this engine has been shut down; create a new Engine")
        if os.getpid() != self._pid:  # else the batch would wait forever for an absent thread
            raise EngineClosed(
                f"this Engine was created in process {self._pid}; this process ({os.getpid()}) "
                "is a fork of it, where its workers and pool thread do not exist: create a new "
                "Engine in the child")
        return backend

    def __repr__(self) -> str:
        state = "closed" if self._backend is None else f"{self.workers} workers"
        return f"<stagepool.Engine {state}: {self.plan.reason}>"

    # ---- context management ------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, cancel_futures=exc[0] is not None)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Shut down without blocking the loop; an exception (or a cancellation) leaving the
        block cancels queued work instead of waiting for it."""
        from ._aio import shutdown_async

        await shutdown_async(self, cancel_futures=exc[0] is not None)

    # ---- batches --------------------------------------------------------------------------------

    def _batch(self, fn: Callable[[Any], Any], items: Iterable[Any], *, chunk_size: Any,
               progress: bool | None, desc: str | None,
               on_progress: Callable[[Progress], object] | None, timeout: Any,
               max_in_flight: int | None = None, max_concurrent: int | None = None) -> _Batch:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        try:
            iter(items)
        except TypeError:
            raise TypeError(f"items must be iterable, not {type(items).__name__}") from None
        size = None if chunk_size is None else validate_chunk_size(chunk_size)
        limit = self.config.timeout if timeout is DEFAULT else check_timeout(timeout)
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        show = self.config.progress if progress is None else progress
        sink = make_sink(progress=show, on_progress=on_progress, total=total, desc=desc)
        from ._config import check_positive_int

        check_positive_int(max_concurrent, "max_concurrent", allow_none=True)
        check_positive_int(max_in_flight, "max_in_flight", allow_none=True)
        return _Batch(self, fn, items, total, chunk_size=size, timeout=limit, sink=sink,
                      max_in_flight=max_in_flight, max_concurrent=max_concurrent)

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        chunk_size: int | str | None = None,
        timeout: Any = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        max_concurrent: int | None = None,
    ) -> BatchReport[R]:
        """Run ``fn`` on every item; return a :class:`BatchReport` with one outcome per item.

        Per-call options override the engine's: ``chunk_size``, ``timeout``, ``progress``
        (with ``desc``), ``on_progress`` (a callback receiving :class:`Progress` after each
        chunk) and ``max_concurrent`` (at most this many items of this call in the workers at
        once, whatever the worker count).

        Never raises because an item failed. ``items`` is consumed lazily (at most
        ``max_in_flight`` chunks ahead), so a generator works. If the generator itself raises,
        the items already taken finish and its exception propagates with the partial report
        attached as ``.report``.

        Cancellation: on ``KeyboardInterrupt`` the batch's queued chunks are withdrawn, the
        workers running its items are killed and replaced, and the interrupt propagates
        (within about ``WAIT_SLICE`` seconds). Shutdown from another thread fails the remaining
        items with kind ``"cancelled"``.
        """
        batch = self._batch(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                            on_progress=on_progress, timeout=timeout,
                            max_concurrent=max_concurrent)
        return _run_to_report(batch)

    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        ordered: bool = True,
        chunk_size: int | str | None = None,
        timeout: Any = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        max_in_flight: int | None = None,
        max_concurrent: int | None = None,
    ) -> Iterator[Outcome[R]]:
        """Stream outcomes as they finish (in input order when ``ordered``).

        Memory stays flat for an endless ``items``: at most ``max_in_flight`` chunks are taken
        ahead of what the consumer has read. Closing the iterator early (``break``, ``close()``)
        withdraws chunks that have not started; running ones finish and are dropped.
        """
        batch = self._batch(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                            on_progress=on_progress, timeout=timeout, max_in_flight=max_in_flight,
                            max_concurrent=max_concurrent)
        return _outcomes(batch, ordered)

    # ---- single calls --------------------------------------------------------------------------

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``.

        The future raises the function's exception (worker traceback as ``__cause__``),
        :class:`WorkerCrashed`, :class:`TaskTimeout` or :class:`SerializationError`. As with the
        stdlib executors, ``future.cancel()`` succeeds (and the call never runs) until the call is
        handed to a worker; from then on the future is running and ``cancel()`` returns False.
        Raises :class:`EngineClosed` after shutdown, and in a process forked from the creator.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return _Single(self, fn, args, kwargs).future

    @property
    def executor(self) -> concurrent.futures.Executor:
        """A standard ``concurrent.futures.Executor`` view (for ``loop.run_in_executor`` etc.)."""
        with self._lock:
            if self._executor is None:
                self._executor = _ExecutorView(self)
            return self._executor

    # ---- async (the bridge lives in _aio) -----------------------------------------------------

    async def map_async(
        self,
        fn: Callable[[T], R],
        items: Iterable[T] | AsyncIterable[T],
        *,
        max_concurrent: int | None = None,
        on_cancel: str = "finish",
        chunk_size: int | str | None = None,
        timeout: Any = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
    ) -> BatchReport[R]:
        """Awaitable :meth:`map`, without blocking the event loop; same report.

        ``items`` may also be an async iterable (read lazily, with backpressure). Concurrent
        calls share the workers fairly by estimated work, so a small request started during a
        big one finishes long before it.

        Cancellation: cancelling the awaiting task (or ``wait_for`` expiring) raises
        ``CancelledError`` at once; chunks not started never start; running items finish with
        their results dropped (``on_cancel="finish"``) or are killed with their workers, which
        are replaced (``"kill"``). The engine stays usable. Details: ``stagepool._aio``.
        """
        from ._aio import map_async

        return await map_async(self, fn, items, max_concurrent=max_concurrent, on_cancel=on_cancel,
                               chunk_size=chunk_size, timeout=timeout, progress=progress, desc=desc,
                               on_progress=on_progress)

    def imap_async(
        self,
        fn: Callable[[T], R],
        items: Iterable[T] | AsyncIterable[T],
        *,
        ordered: bool = False,
        on_cancel: str = "finish",
        max_concurrent: int | None = None,
        max_in_flight: int | None = None,
        chunk_size: int | str | None = None,
        timeout: Any = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
    ) -> OutcomeStream[R]:
        """``async for outcome in engine.imap_async(fn, items)``: outcomes as they finish.

        Cancellation: leaving the loop early (``break``, an exception, ``aclose()``, the end of
        ``async with``) or cancelling the consuming task withdraws what has not started; running
        items follow ``on_cancel`` as in :meth:`map_async`.
        """
        from ._aio import imap_async

        return imap_async(self, fn, items, ordered=ordered, on_cancel=on_cancel,
                          max_concurrent=max_concurrent, max_in_flight=max_in_flight,
                          chunk_size=chunk_size, timeout=timeout, progress=progress, desc=desc,
                          on_progress=on_progress)

    async def submit_async(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Awaitable :meth:`submit`: the value, or the task's exception.

        Cancellation: cancelling the await raises ``CancelledError`` at once; a call not yet
        handed to a worker never runs, one already handed over finishes and its result is dropped.
        """
        from ._aio import submit_async

        return await submit_async(self, fn, *args, **kwargs)

    # ---- lifecycle ------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes."""
        backend = self._backend
        return backend.worker_pids() if backend is not None else []

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 kill: bool = False) -> None:
        """Stop the workers. Idempotent.

        ``wait``: block until queued work is done and the workers have exited.
        ``cancel_futures``: queued items that have not started get outcome kind ``"cancelled"``
        (futures are cancelled). ``kill``: kill running work at once (finishes within seconds even
        with hung tasks); its items get kind ``"cancelled"``.
        """
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.shutdown(wait=wait, cancel_pending=cancel_futures or kill, kill=kill)


class _Single:
    """One ``submit`` call: a one-item task resolved from the pool thread (no caller loop)."""

    def __init__(self, engine: Engine, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.engine = engine
        self.backend = engine._backend_or_raise()
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # All submits share one group: a group per call made dispatch scan thousands of groups
        # (20,000 run_in_executor calls took 95 s). Cancelling one future withdraws its task only.
        self.group = engine._submit_group
        self.task: Task | None = None
        self.tries = 1
        self.call = (fn, args, kwargs)
        self.fn_key, self.fn_blob = engine._apply
        self.future.add_done_callback(self._maybe_withdraw)
        self._send()

    def _send(self) -> None:
        try:
            blob = self.engine._encode([self.call])[0]
        except BaseException as exc:
            self.future.set_exception(SerializationError(
                f"the call {self.call[0]!r} cannot be pickled (function or arguments): "
                f"{type(exc).__name__}: {exc}"))
            return
        timeout = self.engine.config.timeout
        timeouts = None
        if timeout is not None:
            timeouts = (timeout(self.call) if callable(timeout) else timeout,)
        self.task = Task(self.group, self.fn_key, self.fn_blob, blob, 1, self._on_done, timeouts,
                         self._expected(), on_start=self._on_start)
        try:
            self.backend.submit(self.task)
        except BaseException:
            _transport.discard(blob)
            raise

    def _on_start(self, task: Task) -> bool:
        """The task goes to a worker: the future is running from now on (``cancel()`` then
        returns False, as with the stdlib executors), unless it was cancelled just before."""
        if self.future.running():  # sent again after its worker died, or a retry
            return True
        try:
            return self.future.set_running_or_notify_cancel()
        except RuntimeError:  # settled meanwhile (engine shut down): nothing to run
            return False

    def _expected(self) -> float | None:
        """The recent duration of calls to this function, or None (unknown: a worker then takes
        it only when idle, since it might take 1000 s and block a short call queued behind it)."""
        try:
            return self.engine._submit_seconds.get(self.call[0])
        except TypeError:  # an unhashable callable
            return None

    def _learn(self, seconds: float) -> None:
        known = self.engine._submit_seconds
        try:
            old = known.get(self.call[0])
            if old is None and len(known) >= 256:
                known.clear()
            known[self.call[0]] = seconds if old is None else 0.7 * old + 0.3 * seconds
        except TypeError:
            pass

    def _maybe_withdraw(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled() and self.task is not None:
            self.backend.withdraw_task(self.task)

    def _on_done(self, task: Task, result: TaskResult) -> None:
        _transport.discard(task.items_blob)  # a retry pickles the call again
        if self.future.done():
            if isinstance(result, bytes):
                _transport.discard(result)  # nobody will load it
            return
        if isinstance(result, Cancelled) or (
                isinstance(result, LaneDied) and result.reason == "cancelled"):
            self.future.cancel()
            if not self.future.cancelled():  # it was already running: cancel() cannot apply
                self._settle(None, TaskCancelled(f"cancelled: {getattr(result, 'reason', '')}"))
            return
        kind, value, error = self._decode(result)
        cfg = self.engine.config
        if (kind != "ok" and error is not None and self.tries <= cfg.retries
                and _retryable(cfg.retry_on, kind, error)):
            self.tries += 1
            delay = cfg.backoff * 2 ** (self.tries - 2)
            threading.Timer(delay, self._resend).start() if delay else self._resend()
            return
        self._settle(value, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the caller meanwhile: the result is dropped

    def _resend(self) -> None:
        try:
            self._send()
        except EngineClosed as exc:
            self._settle(None, exc)

    def _decode(self, result: TaskResult) -> tuple[Kind, Any, BaseException | None]:
        if isinstance(result, LaneDied):
            seconds = self.task.timeouts[0] if self.task and self.task.timeouts else float("nan")
            kind, error = death_failure(result, 0, "running", seconds)
            return kind, None, error
        assert isinstance(result, bytes)  # Cancelled was handled by the caller
        try:
            values, stamps, errors, _pid, _rss = cast(
                ChunkResult, _transport.loads(result, writable=True, unlink=True))
        except BaseException as exc:
            return "serialization", None, SerializationError(
                f"the result could not be unpickled in the parent: {type(exc).__name__}: {exc}")
        self._learn(stamps[-1] - stamps[0])
        if errors:
            kind, error, _tb = _rebuild_error(errors[0], 0)
            return kind, None, error
        return "ok", values[0], None


class _ExecutorView(concurrent.futures.Executor):
    """The engine as a standard Executor: ``submit``/``map``/``shutdown`` with stdlib semantics."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[R]:
        return self._engine.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[R]:
        """Like ``ProcessPoolExecutor.map``: results in order; an item's exception is raised when
        its result is reached; ``timeout`` bounds the whole iteration."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes = self._engine.imap(functools.partial(star_call, fn), zip(*iterables, strict=False),
                                     chunk_size=chunksize if chunksize > 1 else "auto")

        def results() -> Iterator[R]:
            for outcome in outcomes:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("Executor.map timed out")
                yield outcome.unwrap()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._engine.shutdown(wait, cancel_futures=cancel_futures)
