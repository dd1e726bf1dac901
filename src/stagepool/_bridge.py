"""The asyncio bridge's plumbing: the threads calls run in, and their sources and cancellation.

The event loop never blocks on anything here: a call's body runs in a pooled helper thread
(:class:`_Threads`), a sync source is read there, an async source is stepped on the loop by a pump
task and handed over through a bounded queue (:class:`AsyncFeed`), and :class:`Call` lets the
loop cancel a call at any moment without waiting. The public calls are in ``_aio``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ._batch import Batch
from ._lazy import LazyModule
from ._progress import Progress, Shield

if TYPE_CHECKING:
    import asyncio
else:  # the async calls import it; a script that never awaits does not pay for it
    asyncio = LazyModule("asyncio", globals())

__all__ = ["Call", "MakeBatch", "check_on_cancel", "handoff", "post", "start_thread", "threads"]

T = TypeVar("T")

_ON_CANCEL = ("finish", "kill")

# Items of an async source read ahead of what the batch has taken. More hides the round trip
# between the batch thread and the loop (one wake-up per READ_AHEAD / 2 items); fewer keeps
# memory flat when items are big (a decoded frame, a segment in memory).
READ_AHEAD = 16
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


def check_on_cancel(on_cancel: str) -> bool:
    """True for "kill"; a ValueError for anything but the two policies."""
    if on_cancel not in _ON_CANCEL:
        raise ValueError(f"on_cancel must be 'finish' or 'kill', got {on_cancel!r}")
    return on_cancel == "kill"


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
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
        self._count = self._idle = 0

    def start(self, target: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        with self._cond:
            self._work.append((target, future))
            if self._idle:
                self._cond.notify()
                return future
            if self._count >= self._limit:
                return future
            self._count += 1
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
                        self._count -= 1
                        return
                target, future = self._work.popleft()
            _settle(future, target)

    def busy(self) -> int:
        """Threads running a call now (for tests and diagnostics)."""
        with self._cond:
            return self._count - self._idle


def _settle(future: concurrent.futures.Future[T], target: Callable[[], T]) -> None:
    try:
        result = target()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


threads = _Threads(MAX_THREADS)


def start_thread(target: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``target`` in a new daemon thread of its own (for work that must not wait for a
    pooled thread, such as a shutdown); its result or exception lands in the future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    threading.Thread(target=_settle, args=(future, target), name=name, daemon=True).start()
    return future


_handoff_pool: concurrent.futures.ThreadPoolExecutor | None = None
_handoff_lock = threading.Lock()


def handoff() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that pickle and submit single calls for ``submit_async`` (never the loop)."""
    global _handoff_pool
    with _handoff_lock:
        if _handoff_pool is None:
            _handoff_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="stagepool-aio-submit")
        return _handoff_pool


# ---- one call's shared state --------------------------------------------------------------------


class Call:
    """One async batch call, seen from both threads. The loop may cancel it at any moment, even
    before the batch thread has built the batch; ``cancel`` never blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: str) -> None:
        self.loop = loop
        self.kill = check_on_cancel(on_cancel)
        self.cancelled = False
        self._lock = threading.Lock()
        self._batch: Batch | None = None
        self._feed: AsyncFeed | None = None

    def source(self, items: Any) -> Iterable[Any]:
        """On the loop: an async source starts its pump here; a sync one is wrapped as it is."""
        if hasattr(items, "__aiter__"):
            self._feed = AsyncFeed(items.__aiter__(), self)
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
                post(self.loop, shield, fn, progress)

        return relay

    def run(self, work: Callable[[], T]) -> concurrent.futures.Future[T]:
        return threads.start(work)

    async def awaited(self, work: Callable[[], T]) -> T:
        """Run ``work`` in a pooled thread and await it: a cancellation of the awaiting task
        cancels the call (and propagates); the source is closed either way."""
        try:
            return await asyncio.wrap_future(self.run(work))
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self.close_source()


class _Source:
    """A sync iterable read by the batch thread; it ends early once the call is cancelled, so
    a cancelled batch stops taking items instead of turning every remaining one into a chunk."""

    def __init__(self, items: Iterable[Any], call: Call) -> None:
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

    def __init__(self, items: Any, call: Call) -> None:
        super().__init__(items, call)
        self._len = len(items)

    def __len__(self) -> int:
        return self._len


class AsyncFeed:
    """An async iterator stepped on the loop, read by the batch thread as a plain iterator.

    A pump task on the loop reads up to ``READ_AHEAD`` items ahead into a thread-safe queue and
    waits when it is full; the batch thread wakes it when the queue is half empty. An exception
    from the source is handed over as it is, so it ends the batch like a sync generator's:
    items taken finish, the exception propagates with ``.report``."""

    def __init__(self, source: AsyncIterator[Any], call: Call) -> None:
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
        post(self._loop, self._task.cancel)

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
            post(self._loop, self._room.set)
