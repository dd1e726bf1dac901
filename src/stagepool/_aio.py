"""The asyncio bridge: await batches without blocking the event loop.

The loop thread never pickles, waits on a pipe, joins a process or reads psutil. Each call runs
the same batch driver as ``Engine.map`` / ``Engine.imap`` in a helper thread of its own; the loop
only starts it, awaits a future and, for an async source, steps the source's ``__anext__``.

    event loop thread                          batch thread (pooled, <= MAX_THREADS)  pool thread
    map_async ----start----------------------> make_batch(_Source | _AsyncFeed, relay)
      |                                          run_to_report / outcome_lists ---------> backend
      |   async source: _AsyncFeed._pump  ----->  bounded read-ahead (READ_AHEAD items)
      |   on_progress <--- call_soon_threadsafe - progress after each chunk
      |   report      <--- wrap_future --------- report, or the exception (.report attached)
      |   imap_async  <--- call_soon_threadsafe - one list of outcomes per chunk, at most
      |                                          STREAM_AHEAD lists ahead of the consumer
    cancel -> _Call.cancel() -> Batch.abandon(): no chunk is sent after this point, queued
              chunks are withdrawn, running ones finish unobserved ("finish") or their workers
              are killed ("kill"); the source stops being read; the batch thread is woken and
              leaves the batch. Returns at once: nothing here waits.

Fairness between concurrent calls comes from the backend: every call is its own group of chunks,
and idle workers take the next chunk from the groups in turn.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import Any, Generic, TypeVar

from ._batch import Batch
from ._config import check_bool
from ._errors import TaskCancelled
from ._outcome import BatchReport, Outcome
from ._progress import Progress, Shield
from ._streams import outcome_lists, run_to_report

__all__ = ["imap_async", "map_async", "shutdown_async", "submit_async"]

T = TypeVar("T")
R = TypeVar("R")

_ON_CANCEL = ("finish", "kill")

# Items of an async source read ahead of what the batch has taken. More hides the round trip
# between the batch thread and the loop (one wake-up per READ_AHEAD / 2 items); fewer keeps
# memory flat when items are big (a decoded frame, a segment in memory).
READ_AHEAD = 16
# Lists of outcomes (one per finished chunk) an ``imap_async`` stream may hold before its consumer
# reads them. With the batch's own ``max_in_flight`` this bounds what a slow consumer costs.
STREAM_AHEAD = 4
# How long a helper thread blocks at most before it looks again at "cancelled" or "loop closed".
WAIT_SLICE = 0.2
# Batch threads at once, whatever the number of concurrent calls (each runs one call's batch
# loop; further calls wait for a free thread). More lets more calls make progress at once; a
# thread costs ~8 MiB of address space and a slot in the GIL's rotation. Idle threads exit
# after THREAD_IDLE_SECONDS.
MAX_THREADS = 32
THREAD_IDLE_SECONDS = 10.0

# What builds a call's batch from its source (sync or fed from an async one) and its progress
# relay; the engine makes it, with every option already validated.
MakeBatch = Callable[[Iterable[Any], "Callable[[Progress], object] | None"], Batch]

_ITEM, _END, _ERROR = 0, 1, 2


def _check_on_cancel(on_cancel: str) -> bool:
    """True for "kill"; a ValueError for anything but the two policies."""
    if on_cancel not in _ON_CANCEL:
        raise ValueError(f"on_cancel must be 'finish' or 'kill', got {on_cancel!r}")
    return on_cancel == "kill"


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """``call_soon_threadsafe`` that tolerates a loop closed meanwhile (nobody is listening)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class _Threads:
    """A bounded set of daemon threads running call bodies in arrival order.

    Each call's future is marked running from the start, so cancelling the awaiting task (which
    makes ``wrap_future`` call ``future.cancel()``) cannot cancel it: the thread always settles
    it (a call cancelled while it waits for a thread leaves at once through its own flag)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._work: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque())
        self._cond = threading.Condition()
        self._threads = self._idle = 0

    def start(self, target: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        with self._cond:
            self._work.append((target, future))
            if self._idle:
                self._cond.notify()
                return future
            if self._threads >= self._limit:
                return future
            self._threads += 1
        threading.Thread(target=self._serve, name="stagepool-aio-batch", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._work:
                    self._idle += 1
                    woken = self._cond.wait(THREAD_IDLE_SECONDS)
                    self._idle -= 1
                    if not woken and not self._work:
                        self._threads -= 1
                        return
                target, future = self._work.popleft()
            _settle(future, target)

    def busy(self) -> int:
        """Threads running a call now (for tests and diagnostics)."""
        with self._cond:
            return self._threads - self._idle


def _settle(future: concurrent.futures.Future[T], target: Callable[[], T]) -> None:
    try:
        result = target()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


_threads = _Threads(MAX_THREADS)


def _start_thread(target: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``target`` in a new daemon thread of its own (for work that must not wait for a
    pooled thread, such as a shutdown); its result or exception lands in the future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    threading.Thread(target=_settle, args=(future, target), name=name, daemon=True).start()
    return future


_handoff_pool: concurrent.futures.ThreadPoolExecutor | None = None
_handoff_lock = threading.Lock()


def _handoff() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that pickle and submit single calls for ``submit_async`` (never the loop)."""
    global _handoff_pool
    with _handoff_lock:
        if _handoff_pool is None:
            _handoff_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="stagepool-aio-submit")
        return _handoff_pool


# ---- one call's shared state --------------------------------------------------------------------


class _Call:
    """One async batch call, seen from both threads. The loop may cancel it at any moment, even
    before the batch thread has built the batch; ``cancel`` never blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: str) -> None:
        self.loop = loop
        self.kill = _check_on_cancel(on_cancel)
        self.cancelled = False
        self._lock = threading.Lock()
        self._batch: Batch | None = None
        self._feed: _AsyncFeed | None = None

    def source(self, items: Any) -> Iterable[Any]:
        """On the loop: an async source starts its pump here; a sync one is wrapped as it is."""
        if hasattr(items, "__aiter__"):
            self._feed = _AsyncFeed(items.__aiter__(), self)
            return self._feed
        if hasattr(items, "__len__"):
            return _SizedSource(items, self)
        return _Source(items, self)

    def attach(self, batch: Batch) -> Batch:
        """In the batch thread, before it runs: from now on a cancel abandons this batch."""
        with self._lock:
            self._batch = batch
            cancelled = self.cancelled
        if cancelled:
            batch.abandon(kill_running=self.kill)
        return batch

    def cancel(self) -> None:
        """From any thread, idempotent, never blocks: stop reading the source, withdraw what has
        not started, kill by policy, and make the batch thread leave the batch."""
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            batch = self._batch
        if batch is not None:
            batch.abandon(kill_running=self.kill)
        self.close_source()

    def close_source(self) -> None:
        if self._feed is not None:
            self._feed.stop()

    def relay(self, fn: Callable[[Progress], object] | None) -> Callable[[Progress], object] | None:
        """``on_progress`` runs on the loop (it may touch loop objects), never after a cancel;
        if it raises, that is logged once and it is not called again (see ``_progress``)."""
        if fn is None:
            return None
        shield = Shield(f"the on_progress callback {fn!r}")

        def relay(progress: Progress) -> None:
            if not self.cancelled and not shield.broken:
                _post(self.loop, shield, fn, progress)

        return relay

    def run(self, work: Callable[[], T]) -> concurrent.futures.Future[T]:
        return _threads.start(work)


class _Source:
    """A sync iterable read by the batch thread; it ends early once the call is cancelled, so
    a cancelled batch stops taking items instead of turning every remaining one into a chunk."""

    def __init__(self, items: Iterable[Any], call: _Call) -> None:
        try:
            self._it = iter(items)
        except TypeError:
            raise TypeError("items must be an iterable or an async iterable, "
                            f"not {type(items).__name__}") from None
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._call.cancelled:
            raise StopIteration
        return next(self._it)


class _SizedSource(_Source):
    """A sized source keeps its length: the chunk sizer and the progress bar use it."""

    def __init__(self, items: Any, call: _Call) -> None:
        super().__init__(items, call)
        self._len = len(items)

    def __len__(self) -> int:
        return self._len


class _AsyncFeed:
    """An async iterator stepped on the loop, read by the batch thread as a plain iterator.

    A pump task on the loop reads up to ``READ_AHEAD`` items ahead into a thread-safe queue and
    waits when it is full; the batch thread wakes it when the queue is half empty. An exception
    from the source is handed over as it is, so it ends the batch like a sync generator's:
    items taken finish, the exception propagates with ``.report``."""

    def __init__(self, source: AsyncIterator[Any], call: _Call) -> None:
        self._source, self._call, self._loop = source, call, call.loop
        self._items: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # items the pump put and the batch thread has not taken
        self._pump_waiting = False
        self._room = asyncio.Event()
        self._over = False  # batch thread side: the end or an error was seen
        self._task = self._loop.create_task(self._pump(), name="stagepool-aio-feed")

    # -- loop side
    async def _pump(self) -> None:
        try:
            while True:
                await self._wait_room()
                try:
                    item = await self._source.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    self._items.put((_ERROR, exc))
                    return
                with self._lock:
                    self._queued += 1
                self._items.put((_ITEM, item))
        finally:
            self._items.put((_END, None))  # after an error it is never read; harmless

    async def _wait_room(self) -> None:
        while True:
            with self._lock:
                if self._queued < READ_AHEAD:
                    self._pump_waiting = False
                    return
                self._pump_waiting = True
                self._room.clear()  # under the lock: a wake-up posted after this is not lost
            await self._room.wait()

    def stop(self) -> None:
        """From any thread: stop reading the source (a pending ``__anext__`` is cancelled)."""
        _post(self._loop, self._task.cancel)

    # -- batch thread side
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while not self._over:
            try:
                kind, payload = self._items.get(timeout=WAIT_SLICE)
            except queue.Empty:
                if self._call.cancelled or self._loop.is_closed():
                    self._over = True
                continue
            if kind == _ITEM:
                self._took_one()
                if self._call.cancelled:
                    self._over = True
                    break
                return payload
            self._over = True
            if kind == _ERROR:
                raise payload
        raise StopIteration

    def _took_one(self) -> None:
        with self._lock:
            self._queued -= 1
            wake = self._pump_waiting and self._queued <= READ_AHEAD // 2
            if wake:
                self._pump_waiting = False
        if wake:
            _post(self._loop, self._room.set)


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
        busy worker) and the source is no longer read. Items running then follow
        ``on_cancel``: ``"finish"`` (default) lets them run to the end and drops their results;
        ``"kill"`` kills the workers running them, and the engine starts new ones. Either way
        the engine stays usable and other calls are not affected.

    Shutdown:
        If the engine is shut down while the call runs, the items that never ran get outcome
        kind ``"cancelled"`` in the report (``EngineClosed`` if it was already shut down).
    """
    call = _Call(asyncio.get_running_loop(), on_cancel)
    source = call.source(items)

    def work() -> BatchReport[Any]:
        if call.cancelled:  # cancelled while it waited for a thread: build nothing
            raise asyncio.CancelledError
        batch = make_batch(source, call.relay(on_progress))
        return run_to_report(call.attach(batch))  # after a cancel: partial, and unawaited

    try:
        return await asyncio.wrap_future(call.run(work))
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:
        call.close_source()


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
    _check_on_cancel(on_cancel)
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
        self.call: _Call | None = None
        self.lists: collections.deque[list[Outcome[R]]] = collections.deque()
        self.credits = threading.Semaphore(STREAM_AHEAD)
        self.arrived = asyncio.Event()
        self.ended = self.closed = False
        self.error: BaseException | None = None

    def start(self) -> None:
        """On the loop: open the source (an async one is stepped here), then start the thread."""
        call = self.call = _Call(asyncio.get_running_loop(), self.on_cancel)
        source = call.source(self.items)
        relay = call.relay(self.on_progress)
        self.items = None
        call.run(lambda: self.run(call, lambda: call.attach(self.make_batch(source, relay))))

    def run(self, call: _Call, make: Callable[[], Batch]) -> None:
        """In the batch thread: post one list of outcomes per chunk, within the credits."""
        lists: Generator[list[Outcome[R]], None, None] | None = None
        try:
            if call.cancelled:  # cancelled while it waited for a thread
                return
            lists = outcome_lists(make, self.ordered)
            for outcomes in lists:
                if not self.credit(call):
                    break
                _post(call.loop, self.deliver, outcomes)
        except BaseException as exc:
            _post(call.loop, self.end, exc)
        else:
            _post(call.loop, self.end, None)
        finally:
            if lists is not None:
                lists.close()  # leaving early: the batch withdraws what it still has queued

    def credit(self, call: _Call) -> bool:
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
    sent = _handoff().submit(submit, fn, *args, **kwargs)
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
    await asyncio.wrap_future(_start_thread(shutdown, "stagepool-aio-shutdown"))
