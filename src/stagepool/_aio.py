"""The asyncio bridge: await batches without blocking the event loop.

The loop thread never pickles, waits on a pipe, joins a process or reads psutil. Each call runs
the same batch driver as ``Engine.map`` / ``Engine.imap`` in a pooled helper thread; the loop
only starts it, awaits a future and, for an async source, steps the source's ``__anext__``
(the plumbing is in ``_bridge``). :class:`AsyncCalls` is the engine's async surface.

    event loop thread                          batch thread (pooled, <= MAX_THREADS)  pool thread
    map_async ----start----------------------> make_batch(_Source | _AsyncFeed, relay)
      |                                          run_to_report / outcome_lists ---------> backend
      |   async source: _AsyncFeed._pump  ----->  bounded read-ahead (READ_AHEAD items)
      |   on_progress <--- call_soon_threadsafe - progress after each chunk
      |   report      <--- wrap_future --------- report, or the exception (.report attached)
      |   imap_async  <--- call_soon_threadsafe - one list of outcomes per chunk, at most
      |                                          STREAM_AHEAD lists ahead of the consumer
    cancel -> Call.cancel() -> Batch.abandon(): no chunk is sent after this point, queued
              chunks are withdrawn, running ones finish unobserved ("finish") or their workers
              are killed ("kill"); the source stops being read; the batch thread is woken and
              leaves the batch. Returns at once: nothing here waits.

Fairness between concurrent calls comes from the backend: every call is its own group of chunks,
and idle workers take the next chunk from the groups in turn.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, Self, TypeVar

from ._batch import Batch, BatchSpec
from ._bridge import WAIT_SLICE, Call, MakeBatch, check_on_cancel, handoff, post, start_thread
from ._calls import Calls
from ._config import DEFAULT, Default, Timeout, check_bool
from ._costs import cost_hints
from ._errors import TaskCancelled
from ._journal import Mismatch
from ._lazy import LazyModule
from ._outcome import BatchReport, Outcome
from ._progress import Progress
from ._resume import KeyPlan, key_plan, new_batch, outcome_lists_of, report_of

if TYPE_CHECKING:
    import asyncio
else:  # the async calls import it; a script that never awaits does not pay for it
    asyncio = LazyModule("asyncio", globals())

__all__ = ["AsyncCalls", "OutcomeStream", "imap_async", "map_async", "shutdown_async", "submit_async"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
OnCancel = Literal["finish", "kill"]

# Lists of outcomes (one per finished chunk) an ``imap_async`` stream may hold before its consumer
# reads them. With the batch's own ``max_in_flight`` this bounds what a slow consumer costs.
STREAM_AHEAD = 4


# ---- map_async ------------------------------------------------------------------------------------


async def map_async(
    make_batch: MakeBatch,
    items: Any,
    *,
    on_cancel: str = "finish",
    on_progress: Callable[[Progress], object] | None = None,
) -> BatchReport[Any]:
    """Awaitable ``Engine.map``: run ``fn`` on every item; return the same :class:`BatchReport`.

    ``items`` may be a list, a sync iterable or an **async** iterable. An async source is read
    on the event loop, lazily, at most ``READ_AHEAD`` items ahead of what the batch has taken
    (which itself stays within ``max_in_flight`` chunks); a sync iterator is read in the helper
    thread, as ``Engine.map`` would. If the source raises, the items already taken finish and
    the exception propagates with the partial report attached as ``.report``.

    ``max_concurrent`` bounds how many items of this call are in the workers at once, whatever
    the worker count. Concurrent calls share the workers fairly by estimated work time, so a
    small request is not queued behind a big one. ``on_progress`` is called on the event loop after
    each chunk; if it raises, the exception is logged as a warning (logger ``"stagepool"``), the
    callback is not called again for this call, and the call goes on: no result is lost.

    The loop thread only starts the call and awaits it: pickling, waiting on workers and
    building the report happen in a helper thread.

    Cancellation:
        Cancelling the awaiting task (``task.cancel()``, ``asyncio.wait_for`` or
        ``asyncio.timeout`` expiring, or ``asyncio.run`` handling Ctrl-C) raises
        ``CancelledError`` at once, without waiting for any worker. Chunks not yet started are
        withdrawn and never start (except a chunk of under ~5 ms already prefetched onto a
        busy worker) and the source is no longer read. Chunks running then follow
        ``on_cancel``: ``"finish"`` (default) lets them run to the end (all their items: about
        20 ms of work with ``chunk_size="auto"``, the whole chunk of a fixed ``chunk_size``) and
        drops their results;
        ``"kill"`` kills the workers running them, and the engine starts new ones. Either way
        the engine stays usable and other calls are not affected.

    Shutdown:
        If the engine is shut down while the call runs, the items that never ran get outcome
        kind ``"cancelled"`` in the report (``EngineClosed`` if it was already shut down).
    """
    call = Call(asyncio.get_running_loop(), on_cancel)
    source = call.source(items)

    def work() -> BatchReport[Any]:
        if call.cancelled:  # cancelled while it waited for a thread: build nothing
            raise asyncio.CancelledError
        batch = make_batch(source, call.relay(on_progress))
        return report_of(call.attach(batch))  # after a cancel: partial, and unawaited

    return await call.awaited(work)


# ---- imap_async -----------------------------------------------------------------------------------


def imap_async(
    make_batch: MakeBatch,
    items: Any,
    *,
    ordered: bool = False,
    on_cancel: str = "finish",
    on_progress: Callable[[Progress], object] | None = None,
) -> OutcomeStream[Any]:
    """Stream outcomes as they finish: ``async for outcome in engine.imap_async(fn, items)``.

    Unordered by default (``ordered=True`` for input order). ``items`` may be a sync or an async
    iterable, as for :func:`map_async`. The work starts at the first ``__anext__``; memory stays
    flat for an endless source, since the batch takes at most ``max_in_flight`` chunks ahead and
    at most ``STREAM_AHEAD`` finished chunks wait for a slow consumer. If the source raises, the
    outcomes of the items taken come first, then the exception.

    The stream is also an async context manager: ``async with engine.imap_async(...) as s``
    ends the work when the block ends, however it ends.

    Cancellation:
        Leaving the loop early (``break``, an exception, or cancelling the task iterating)
        withdraws every chunk that has not started, as soon as the stream is closed: at once
        on cancellation, ``aclose()`` or the end of an ``async with``; after a ``break``, when
        the stream is garbage-collected (immediately in CPython, unless you keep a reference,
        in which case call ``aclose()``). Running items follow ``on_cancel`` as in
        :func:`map_async`: ``"finish"`` drops their outcomes, ``"kill"`` kills their workers,
        which are replaced.

    Shutdown:
        An engine shut down under the stream yields ``"cancelled"`` outcomes for items already
        taken that never ran, then ends.
    """
    check_on_cancel(on_cancel)
    check_bool(ordered, "ordered")
    return OutcomeStream(_Stream(make_batch, items, on_progress, ordered=ordered,
                                 on_cancel=on_cancel))


class _Stream(Generic[R]):
    """The state an ``OutcomeStream`` shares with its batch thread. The thread holds this, not
    the stream, so dropping the stream (after a ``break``) finalizes it and withdraws the rest."""

    def __init__(self, make_batch: MakeBatch, items: Any,
                 on_progress: Callable[[Progress], object] | None, *, ordered: bool,
                 on_cancel: str) -> None:
        self.make_batch, self.items, self.on_progress = make_batch, items, on_progress
        self.ordered, self.on_cancel = ordered, on_cancel
        self.call: Call | None = None
        self.lists: collections.deque[list[Outcome[R]]] = collections.deque()
        self.credits = threading.Semaphore(STREAM_AHEAD)
        self.arrived = asyncio.Event()
        self.ended = self.closed = False
        self.error: BaseException | None = None

    def start(self) -> None:
        """On the loop: open the source (an async one is stepped here), then start the thread."""
        call = self.call = Call(asyncio.get_running_loop(), self.on_cancel)
        source = call.source(self.items)
        relay = call.relay(self.on_progress)
        self.items = None
        call.run(lambda: self.run(call, lambda: call.attach(self.make_batch(source, relay))))

    def run(self, call: Call, make: Callable[[], Batch]) -> None:
        """In the batch thread: post one list of outcomes per chunk, within the credits."""
        lists: Generator[list[Outcome[R]], None, None] | None = None
        try:
            if call.cancelled:  # cancelled while it waited for a thread
                return
            lists = outcome_lists_of(make, self.ordered)
            for outcomes in lists:
                if not self.credit(call):
                    break
                post(call.loop, self.deliver, outcomes)
        except BaseException as exc:
            post(call.loop, self.end, exc)
        else:
            post(call.loop, self.end, None)
        finally:
            if lists is not None:
                lists.close()  # leaving early: the batch withdraws what it still has queued

    def credit(self, call: Call) -> bool:
        while not call.cancelled and not call.loop.is_closed():
            if self.credits.acquire(timeout=WAIT_SLICE):
                return True
        return False

    def deliver(self, outcomes: list[Outcome[R]]) -> None:
        if not self.closed:
            self.lists.append(outcomes)
            self.arrived.set()

    def end(self, error: BaseException | None) -> None:
        self.ended = True
        self.error = None if self.closed else error
        if self.call is not None:
            self.call.close_source()
        self.arrived.set()

    def cancel(self) -> None:
        """From any thread (a finalizer too): never blocks."""
        self.closed = True
        if self.call is not None and not self.ended:
            self.call.cancel()


class OutcomeStream(AsyncIterator["Outcome[R]"], Generic[R]):
    """The async iterator returned by ``Engine.imap_async``; see :func:`imap_async`."""

    def __init__(self, state: _Stream[R]) -> None:
        self._state = state
        self._current: collections.deque[Outcome[R]] = collections.deque()

    def __aiter__(self) -> OutcomeStream[R]:
        return self

    async def __anext__(self) -> Outcome[R]:
        state = self._state
        if state.call is None and not state.closed:
            state.start()
        while not self._current:
            if state.lists:
                self._current = collections.deque(state.lists.popleft())
                state.credits.release()
            elif state.ended or state.closed:
                state.closed = True
                error, state.error = state.error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            else:
                state.arrived.clear()
                try:
                    await state.arrived.wait()
                except asyncio.CancelledError:
                    await self.aclose()
                    raise
        return self._current.popleft()

    async def aclose(self) -> None:
        """Stop now: withdraw what has not started; running items follow ``on_cancel``."""
        state = self._state
        if not state.closed:
            state.cancel()
        state.lists.clear()
        self._current.clear()

    async def __aenter__(self) -> OutcomeStream[R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        try:
            if not self._state.closed:
                self._state.cancel()
        except BaseException:
            pass


# ---- submit_async and shutdown ------------------------------------------------------------------


async def submit_async(submit: Callable[..., concurrent.futures.Future[R]], fn: Callable[..., R],
                       /, *args: Any, **kwargs: Any) -> R:
    """Awaitable ``Engine.submit``: run ``fn(*args, **kwargs)`` in a worker; return its value.

    Raises what ``fn`` raised (the worker's traceback as ``__cause__``), or
    :class:`WorkerCrashed`, :class:`TaskTimeout`, :class:`SerializationError`, and
    :class:`EngineClosed` after shutdown. The call and its arguments are pickled in a helper
    thread, never on the loop.

    Cancellation:
        Cancelling the awaiting task (or a ``wait_for`` timing out) raises ``CancelledError``
        at once. A call not yet handed to a worker is withdrawn and never runs; a call already
        handed to one finishes there and its result is dropped (the ``"finish"`` policy: a
        lone call has no ``on_cancel=``, since every keyword goes to ``fn``; for ``"kill"``
        use ``map_async(fn, [x], on_cancel="kill")``).

    Shutdown:
        An engine shut down with ``cancel_futures=True`` before the call started raises
        ``TaskCancelled`` here.
    """
    sent = handoff().submit(submit, fn, *args, **kwargs)
    try:
        future = await asyncio.wrap_future(sent)
    except asyncio.CancelledError:
        sent.add_done_callback(_cancel_sent)  # the hand-off already ran or is running
        raise
    try:
        return await asyncio.wrap_future(future)  # cancelling this cancels ``future``: withdrawn
    except asyncio.CancelledError:
        if future.cancelled() and not _being_cancelled():
            # The engine cancelled the call (a shutdown), not our caller: a bare CancelledError
            # would read as "this task was cancelled" and end it without a word.
            raise TaskCancelled("the call was cancelled before it ran: the engine was shut down "
                                "with cancel_futures=True") from None
        raise


def _being_cancelled() -> bool:
    """Whether the running task itself has been asked to cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancel_sent(sent: concurrent.futures.Future[concurrent.futures.Future[Any]]) -> None:
    if not sent.cancelled() and sent.exception() is None:
        sent.result().cancel()


async def shutdown_async(shutdown: Callable[[], None]) -> None:
    """``Engine.shutdown(wait=True)`` from async code: the waiting happens in a helper thread.

    Cancellation:
        Cancelling the awaiting task raises ``CancelledError`` at once; the shutdown goes on in
        its thread and completes as it would have (the engine is closed to new work already).
    """
    await asyncio.wrap_future(start_thread(shutdown, "stagepool-aio-shutdown"))


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (OutcomeStream,):
    _public.__module__ = "stagepool"

# ---- the engine's async surface -----------------------------------------------------------------


class AsyncCalls(Calls):
    """The async methods of ``Engine`` (the facade inherits them): each validates its arguments
    through the engine, then hands the work to the bridge above; the loop never blocks."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Shut down without blocking the loop; as with ``with``, an exception (or a
        cancellation) leaving the block kills queued and running work instead of waiting."""
        kill = exc[0] is not None
        await shutdown_async(lambda: self.shutdown(True, kill=kill))

    async def map_async(
        self,
        fn: Callable[[T], R],
        items: Iterable[T] | AsyncIterable[T],
        *,
        max_concurrent: int | None = None,
        on_cancel: OnCancel = "finish",
        chunk_size: int | str | None = None,
        timeout: Timeout | Default = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        key: Callable[[T], Hashable] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        finished_kinds: Iterable[str] | None = None,
        checkpoint_mismatch: Mismatch = "refuse",
        cost: Callable[[T], float] | None = None,
        size: Callable[[T], float] | None = None,
        unit: str | None = None,
    ) -> BatchReport[R]:
        """Awaitable :meth:`Engine.map`, without blocking the event loop; same report.

        ``items`` may also be an async iterable (read lazily, with backpressure). Concurrent
        calls share the workers fairly by estimated work, so a small request started during a
        big one finishes long before it.

        Cancellation: cancelling the awaiting task (or ``wait_for`` expiring) raises
        ``CancelledError`` at once; chunks not started never start; running items finish with
        their results dropped (``on_cancel="finish"``) or are killed with their workers, which
        are replaced (``"kill"``). The engine stays usable. Details: ``stagepool._aio``.
        ``key``, ``checkpoint`` and the rest: as for :meth:`Engine.map` (keys are computed and
        the journal written in the helper thread, never on the loop).
        ``cost``, ``size``, ``unit``: as for :meth:`Engine.map` (longest-first for a list).
        """
        hints = cost_hints(cost=cost, size=size, unit=unit, lookahead=None, stream=False)
        spec = self._spec(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                          on_progress=on_progress, timeout=timeout, max_concurrent=max_concurrent,
                          hints=hints)
        plan = key_plan(fn, key=key, checkpoint=checkpoint, finished_kinds=finished_kinds,
                        checkpoint_mismatch=checkpoint_mismatch)
        return await map_async(self._batches(spec, plan), items, on_cancel=on_cancel,
                               on_progress=on_progress)

    def imap_async(
        self,
        fn: Callable[[T], R],
        items: Iterable[T] | AsyncIterable[T],
        *,
        ordered: bool = False,
        on_cancel: OnCancel = "finish",
        max_concurrent: int | None = None,
        max_in_flight: int | None = None,
        chunk_size: int | str | None = None,
        timeout: Timeout | Default = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        key: Callable[[T], Hashable] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        finished_kinds: Iterable[str] | None = None,
        checkpoint_mismatch: Mismatch = "refuse",
        cost: Callable[[T], float] | None = None,
        size: Callable[[T], float] | None = None,
        unit: str | None = None,
        lookahead: int | None = None,
    ) -> OutcomeStream[R]:
        """``async for outcome in engine.imap_async(fn, items)``: outcomes as they finish.

        Cancellation: leaving the loop early (``break``, an exception, ``aclose()``, the end of
        ``async with``) or cancelling the consuming task withdraws what has not started; running
        items follow ``on_cancel`` as in :meth:`map_async`. ``key``, ``checkpoint`` and the
        rest: as for :meth:`Engine.map`.
        ``cost``, ``size``, ``unit``, ``lookahead``: as for :meth:`Engine.imap`.
        """
        hints = cost_hints(cost=cost, size=size, unit=unit, lookahead=lookahead, stream=True)
        spec = self._spec(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                          on_progress=on_progress, timeout=timeout, max_in_flight=max_in_flight,
                          max_concurrent=max_concurrent, hints=hints)
        plan = key_plan(fn, key=key, checkpoint=checkpoint, finished_kinds=finished_kinds,
                        checkpoint_mismatch=checkpoint_mismatch)
        return imap_async(self._batches(spec, plan), items, ordered=ordered, on_cancel=on_cancel,
                          on_progress=on_progress)

    def _batches(self, spec: BatchSpec, plan: KeyPlan | None) -> Callable[..., Batch]:
        """What an async call builds its batch with, from its source and progress relay."""
        backend = self._backend_or_raise()

        def make(source: Iterable[Any], relay: Callable[[Progress], object] | None) -> Batch:
            return new_batch(backend, dataclasses.replace(spec, items=source, on_progress=relay),
                             plan)

        return make

    async def submit_async(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Awaitable :meth:`Engine.submit`: the value, or the task's exception.

        Cancellation: cancelling the await raises ``CancelledError`` at once; a call not yet
        handed to a worker never runs, one already handed over finishes and its result is dropped.
        Shutdown: a call the engine cancels (``shutdown(cancel_futures=True)`` before it started)
        raises :class:`TaskCancelled`, never a bare ``CancelledError``.
        """
        return await submit_async(self.submit, fn, *args, **kwargs)
