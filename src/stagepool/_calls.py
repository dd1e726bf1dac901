"""The engine's synchronous calls: each validates its arguments into a spec (before anything
starts), then runs the batch driver (``map``, ``imap``) or the single-call path (``submit``, the
Executor view). ``Engine`` inherits them through :class:`AsyncCalls`, whose async calls validate
through the same :meth:`Calls._spec`.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import threading
from collections.abc import AsyncIterable, Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._answers import BatchPolicy
from ._backends import Backend
from ._batch import BatchSpec
from ._config import (
    DEFAULT,
    Default,
    EngineConfig,
    Timeout,
    check_bool,
    check_positive_int,
    check_timeout,
    validate_chunk_size,
)
from ._costs import CostHints, cost_hints
from ._journal import Mismatch
from ._outcome import BatchReport, Outcome
from ._progress import Progress, check_progress_options
from ._resume import key_plan, new_batch, outcome_lists_of, report_of
from ._single import ExecutorView, Single, SubmitContext
from ._streams import outcomes

__all__ = ["Calls", "check_fn", "serial_cannot"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class Calls:
    """``map``, ``imap``, ``submit`` and ``executor`` of ``Engine`` (the facade provides the
    configuration, the backend and shutdown)."""

    config: EngineConfig
    _policy: BatchPolicy
    _submits: SubmitContext
    _lock: threading.Lock
    _executor: ExecutorView | None

    if TYPE_CHECKING:  # provided by Engine
        def _backend_or_raise(self) -> Backend: ...

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                     kill: bool = False) -> None: ...

    # ---- batches --------------------------------------------------------------------------------

    def _spec(self, fn: Callable[[Any], Any], items: Iterable[Any] | AsyncIterable[Any], *,
              chunk_size: Any, progress: bool | None, desc: str | None,
              on_progress: Callable[[Progress], object] | None, timeout: Timeout | Default,
              max_in_flight: int | None = None, max_concurrent: int | None = None,
              hints: CostHints | None = None) -> BatchSpec:
        """Validate one call's arguments (before anything starts) into its spec."""
        check_fn(fn)
        if not hasattr(items, "__aiter__"):
            try:
                iter(items)
            except TypeError:
                raise TypeError(f"items must be iterable, not {type(items).__name__}") from None
        if isinstance(items, str | bytes | bytearray):  # one path, not a list of characters
            raise TypeError(
                f"items is a {type(items).__name__} ({items[:40]!r}): map() would run fn on each "
                f"character; pass a list such as [{items[:20]!r}], or list(items) if you do mean "
                "the characters")
        limit = self.config.timeout if timeout is DEFAULT else check_timeout(timeout)
        if limit is not None and not self._backend_or_raise().capabilities.hard_timeouts:
            raise ValueError(serial_cannot("timeout"))
        check_positive_int(max_concurrent, "max_concurrent", allow_none=True)
        check_positive_int(max_in_flight, "max_in_flight", allow_none=True)
        check_progress_options(progress=progress, on_progress=on_progress, desc=desc)
        return BatchSpec(
            fn, items, len(items) if hasattr(items, "__len__") else None,  # type: ignore[arg-type]
            self.config.chunk_size if chunk_size is None else validate_chunk_size(chunk_size),
            limit, self._policy,
            self.config.progress if progress is None else progress, desc, on_progress,
            max_in_flight, max_concurrent, hints)

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        chunk_size: int | str | None = None,
        timeout: Timeout | Default = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        max_concurrent: int | None = None,
        key: Callable[[T], Hashable] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        finished_kinds: Iterable[str] | None = None,
        checkpoint_mismatch: Mismatch = "refuse",
        cost: Callable[[T], float] | None = None,
        size: Callable[[T], float] | None = None,
        unit: str | None = None,
    ) -> BatchReport[R]:
        """Run ``fn`` on every item; return a :class:`BatchReport` with one outcome per item.

        Per-call options override the engine's: ``chunk_size``, ``timeout``, ``progress``
        (with ``desc``), ``on_progress`` (a callback receiving :class:`Progress` after each
        chunk) and ``max_concurrent`` (at most this many items of this call in the workers at
        once, whatever the worker count).

        Cost hints (README "Uneven items"): ``cost`` (a callable of the item, e.g. its seconds of
        media) makes a batch of known length run its items longest-first and cut chunks by
        cost, not count; an input of unknown length is reordered in blocks of ``lookahead``
        items. Results keep input order. ``unit="s"`` (with ``cost``, or ``size``: each item's
        seconds of media) shows media seconds, a cost-weighted ETA and the realtime factor. A
        ``cost`` or ``size`` that raises or returns anything but a finite number >= 0 fails
        that item alone (kind ``"error"``, the message names ``cost(item i)``); it never runs.

        Never raises because an item failed. ``items`` is consumed lazily (at most
        ``max_in_flight`` chunks ahead), so a generator works. If the generator itself raises,
        the items already taken finish and its exception propagates with the partial report
        attached as ``.report``. Nor because progress failed: an ``on_progress`` callback (or the
        bar) that raises is logged as a warning with its traceback (logger ``"stagepool"``) and
        not called again; the batch goes on and no result is lost. The same holds for
        :meth:`imap` and the async calls (whose callback runs on the event loop).

        Keys and checkpoints (the same for :meth:`imap` and the async calls): ``key`` (a
        callable of the item, e.g. a segment's path and time range) puts its value on each
        outcome (``outcome.key``, ``report.keys``). ``checkpoint`` (a directory) journals each
        finished outcome as it arrives; running the same call again skips the items it holds and
        returns the full report, values included. Items are matched by ``key`` (unique within
        the batch), else by index and content. ``finished_kinds`` (default ``("ok",)``; add
        ``"error"`` etc.) says which journaled outcomes are not run again.
        ``checkpoint_mismatch``: a journal written for another function or other keys raises
        :class:`CheckpointError` (``"refuse"``), is discarded (``"restart"``) or used anyway
        (``"reuse"``). A key that raises, is unhashable or repeats raises ``ValueError`` /
        ``TypeError`` naming the item, before any item runs for a sized input (for an iterator,
        as a failing items iterable does); an unwritable directory raises
        :class:`CheckpointError` here. Format and crash safety: ``stagepool._journal``.

        Cancellation: on ``KeyboardInterrupt`` the batch's queued chunks are withdrawn, the
        workers running its items are killed and replaced, and the interrupt propagates
        (within about ``WAIT_SLICE`` seconds). Shutdown from another thread fails the remaining
        items with kind ``"cancelled"``.
        """
        _refuse_async_items(items)
        hints = cost_hints(cost=cost, size=size, unit=unit, lookahead=None, stream=False)
        spec = self._spec(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                          on_progress=on_progress, timeout=timeout, max_concurrent=max_concurrent,
                          hints=hints)
        plan = key_plan(fn, key=key, checkpoint=checkpoint, finished_kinds=finished_kinds,
                        checkpoint_mismatch=checkpoint_mismatch)
        return report_of(new_batch(self._backend_or_raise(), spec, plan))

    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        ordered: bool = True,
        chunk_size: int | str | None = None,
        timeout: Timeout | Default = DEFAULT,
        progress: bool | None = None,
        desc: str | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        max_in_flight: int | None = None,
        max_concurrent: int | None = None,
        key: Callable[[T], Hashable] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        finished_kinds: Iterable[str] | None = None,
        checkpoint_mismatch: Mismatch = "refuse",
        cost: Callable[[T], float] | None = None,
        size: Callable[[T], float] | None = None,
        unit: str | None = None,
        lookahead: int | None = None,
    ) -> Iterator[Outcome[R]]:
        """Stream outcomes as they finish (in input order when ``ordered``).

        Memory stays flat for an endless ``items``: at most ``max_in_flight`` chunks are taken
        ahead of what the consumer has read. Closing the iterator early (``break``, ``close()``)
        withdraws chunks that have not started; running ones finish and are dropped. Nothing
        starts (and nothing is held) until the first ``next``; arguments are checked here.
        ``key``, ``checkpoint`` and the rest: as for :meth:`map` (the journal is opened at the
        first ``next``; restored outcomes are streamed in their places).

        ``cost``, ``size``, ``unit``: as for :meth:`map`, except that the items are reordered
        longest-first in blocks of ``lookahead`` items (default 8 per worker), so memory stays
        bounded and the first outcomes do not wait for the whole input.
        """
        check_bool(ordered, "ordered")
        _refuse_async_items(items)
        hints = cost_hints(cost=cost, size=size, unit=unit, lookahead=lookahead, stream=True)
        spec = self._spec(fn, items, chunk_size=chunk_size, progress=progress, desc=desc,
                          on_progress=on_progress, timeout=timeout, max_in_flight=max_in_flight,
                          max_concurrent=max_concurrent, hints=hints)
        plan = key_plan(fn, key=key, checkpoint=checkpoint, finished_kinds=finished_kinds,
                        checkpoint_mismatch=checkpoint_mismatch)
        self._backend_or_raise()
        # Through self: the stream holds its engine, which a caller may not (_abandon).
        return outcomes(lambda: new_batch(self._backend_or_raise(), spec, plan), ordered,
                        outcome_lists_of)

    # ---- single calls --------------------------------------------------------------------------

    def submit(self, fn: Callable[P, R], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``.

        The future raises the function's exception (worker traceback as ``__cause__``),
        :class:`WorkerCrashed`, :class:`TaskTimeout` or :class:`SerializationError`. As with the
        stdlib executors, ``future.cancel()`` succeeds (and the call never runs) until the call is
        handed to a worker; from then on the future is running and ``cancel()`` returns False.
        Raises :class:`EngineClosed` after shutdown, and in a process forked from the creator.
        A callable ``timeout`` is called with the call's own arguments.
        """
        check_fn(fn)
        self._backend_or_raise()
        return Single(self._submits, fn, args, kwargs).future

    @property
    def executor(self) -> concurrent.futures.Executor:
        """A standard ``concurrent.futures.Executor`` view (for ``loop.run_in_executor`` etc.)
        with ``ProcessPoolExecutor``'s semantics, except that a failing call never breaks the
        pool (README: "Drop-in for concurrent.futures"). Its ``shutdown`` shuts this engine down."""
        with self._lock:
            if self._executor is None:
                self._executor = ExecutorView(self.submit, self.shutdown)
            return self._executor


def check_fn(fn: object) -> None:
    """Refuse what cannot be an item's function: a non-callable, or a coroutine function, whose
    coroutine nobody would await (an unpicklable result in a worker, a silent "ok" in process)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"fn must be a plain function, not a coroutine function ({fn!r}): the engine calls it "
            "and nothing awaits the coroutine; make it a plain def (the async calls await the "
            "engine, not fn)")


def _refuse_async_items(items: object) -> None:
    """``map`` and ``imap`` read ``items`` with ``for``; the async calls take async iterables."""
    if hasattr(items, "__aiter__") and not hasattr(items, "__iter__"):
        raise TypeError(f"items is an async iterable ({type(items).__name__}): use map_async or "
                        "imap_async, or pass a plain iterable")


def serial_cannot(option: str) -> str:
    return (f"{option}= needs a backend that runs items in worker processes: the serial backend "
            "runs them in this process, where a running item cannot be stopped or capped; use "
            "backend='local'")
