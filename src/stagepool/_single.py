"""Single calls: ``Engine.submit`` (a one-item task resolved from the backend's thread, no
caller loop) and the standard ``concurrent.futures.Executor`` view of an engine."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar, cast

from ._answers import BatchPolicy
from ._backends import Backend, Cancelled, Group, LaneDied, Task, TaskResult
from ._bundle import CallBundler
from ._config import Timeout, check_int, item_timeouts
from ._errors import SerializationError, TaskCancelled
from ._failures import (
    KILLED_BY,
    death_failure,
    lost_result_error,
    rebuild_error,
    retryable,
    unpickled_result_error,
)
from ._outcome import Kind
from ._worker import ChunkResult, apply_call, call_chunk

__all__ = ["ExecutorView", "Single", "SubmitContext"]

R = TypeVar("R")

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
# Functions whose recent call time is remembered; past this the table starts afresh.
MAX_KNOWN_FUNCTIONS = 256


class SubmitContext:
    """What every ``submit`` of one engine shares: its backend, one group (a group per call made
    dispatch scan thousands of groups: 20,000 run_in_executor calls took 95 s), the policy, and
    the recent duration of calls per function, which lets a worker take the next short call
    before it answers the current one."""

    def __init__(self, backend: Backend, policy: BatchPolicy, timeout: Timeout) -> None:
        self.backend, self.policy, self.timeout = backend, policy, timeout
        self.apply = backend.codec.function(apply_call)
        # Short calls may travel to a worker together (_bundle.py; the local backend decides),
        # unless a call must run at most once: a bundle's finished calls whose answer dies with
        # its worker would run again.
        self.group = (CallBundler(backend, self.apply[0]).group if policy.rerun_innocent
                      else Group())
        # Keyed by the function's name, not the function: a key must not keep a bound
        # method's object alive.
        self.seconds: dict[tuple[str, ...], float] = {}

    def expected(self, fn: Callable[..., Any]) -> float | None:
        return self.seconds.get(_fn_name(fn))

    def learn(self, fn: Callable[..., Any], seconds: float) -> None:
        key, known = _fn_name(fn), self.seconds
        old = known.get(key)
        if old is None and len(known) >= MAX_KNOWN_FUNCTIONS:
            known.clear()
        known[key] = seconds if old is None else 0.7 * old + 0.3 * seconds


def _fn_name(fn: Callable[..., Any]) -> tuple[str, ...]:
    """A key naming ``fn``; a partial is named by its function and the callables it binds, so
    ``Executor.map``'s chunks of different functions are timed apart."""
    if isinstance(fn, functools.partial):
        bound = (part for arg in fn.args if callable(arg) for part in _fn_name(arg))
        return (*_fn_name(fn.func), *bound)
    return (getattr(fn, "__module__", None) or "", getattr(fn, "__qualname__", None) or repr(type(fn)))


def call_name(fn: Callable[..., Any]) -> str:
    """A function's name for messages; ``Executor.map``'s chunk call is named by the function it
    maps."""
    if isinstance(fn, functools.partial):
        mapped = [arg for arg in fn.args if callable(arg)] if fn.func is call_chunk else []
        return call_name(mapped[0] if mapped else fn.func)
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class Single:
    """One ``submit`` call: its future, and its task while it is owed an answer."""

    def __init__(self, ctx: SubmitContext, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.ctx = ctx
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: Task | None = None
        self.tries = 1
        self.call: Call | None = (fn, args, kwargs)
        self.subject = f"the call {call_name(fn)}()"  # what its failures name (not "item 0")
        # By weak reference: the future outlives this object (the caller holds it), and a
        # future -> Single -> future cycle kept every finished future and its result alive
        # until the garbage collector ran. The task holds this object while it is owed an answer.
        self.future.add_done_callback(functools.partial(_when_done, weakref.ref(self)))
        self._send()

    def _send(self) -> None:
        call = self.call
        assert call is not None
        codec = self.ctx.backend.codec
        limits = self._limits(call)
        if isinstance(limits, BaseException):
            self._settle(None, limits)
            return
        try:
            encoded = codec.encode([call], None)
        except Exception as exc:
            self._settle(None, SerializationError(
                f"the call {call[0]!r} cannot be pickled (function or arguments): "
                f"{type(exc).__name__}: {exc}", cause=exc))
            return
        key, fn_form = self.ctx.apply
        self.task = Task(self.ctx.group, key, fn_form, encoded.payload, 1, self._on_done, limits,
                         self.ctx.expected(call[0]), on_start=self._on_start)
        try:
            self.ctx.backend.submit_many([self.task])
        except BaseException:
            codec.release(encoded.payload, None)
            raise

    def _limits(self, call: Call) -> tuple[float, ...] | BaseException | None:
        """A callable ``timeout`` gets the call's own arguments, as ``fn`` does."""
        timeout = self.ctx.timeout
        if callable(timeout):
            fn_timeout = timeout
            return item_timeouts(lambda c: fn_timeout(*c[1], **c[2]), [call], 0)
        return item_timeouts(timeout, [call], 0)

    def _on_start(self, task: Task) -> bool:
        """The task goes to a worker: the future is running from now on (``cancel()`` then
        returns False, as with the stdlib executors), unless it was cancelled just before."""
        if self.future.running():  # sent again after its worker died, or a retry
            return True
        try:
            return self.future.set_running_or_notify_cancel()
        except RuntimeError:  # settled meanwhile (engine shut down): nothing to run
            return False

    def _maybe_withdraw(self, future: concurrent.futures.Future[Any]) -> None:
        task = self.task
        if future.cancelled() and task is not None:
            self.ctx.backend.withdraw_task(task)
        self.call = self.task = None  # the future must not keep the call's objects alive

    def _on_done(self, task: Task, result: TaskResult) -> None:
        """In the backend's thread. Whatever fails here still settles the future (a pending one
        would leave its caller waiting forever), then is reported by the backend."""
        try:
            self._answer(task, result)
        except BaseException as exc:  # a done-callback's SystemExit lands here too
            self._settle(None, exc)
            raise

    def _answer(self, task: Task, result: TaskResult) -> None:
        codec = self.ctx.backend.codec
        codec.release(task.items, None)  # a retry encodes the call again
        if self.future.done() or self.call is None:
            codec.drop(result)  # nobody will decode it
            return
        if isinstance(result, Cancelled) and result.cause is not None:  # the backend failed
            failed = TaskCancelled(f"the call never finished: {result.reason}")
            failed.__cause__ = result.cause
            self._settle(None, failed)
            return
        if isinstance(result, LaneDied) and result.reason in KILLED_BY:  # it ran, or was running
            self._settle(None, lost_result_error(result, self.subject, "") if result.offset < 0
                         and result.ran else death_failure(result, self.subject, "running",
                                                           float("nan"))[1])
            return
        if isinstance(result, Cancelled):
            self.future.cancel()
            if not self.future.cancelled():  # it was already running: cancel() cannot apply
                self._settle(None, TaskCancelled(f"cancelled: {result.reason}"))
            return
        if isinstance(result, LaneDied) and result.reason == "lost":
            self._lost(result)
            return
        kind, value, error = self._decode(task, result)
        policy = self.ctx.policy
        if error is not None and self.tries <= policy.retries and retryable(
                policy.retry_on, kind, error):
            self.tries += 1
            # From a timer thread even without a delay: a resend pickles the call and runs a
            # callable timeout (user code), neither of which may stall or end the pool thread.
            threading.Timer(policy.backoff * 2 ** (self.tries - 2), self._resend).start()
            return
        self._settle(value, error)

    def _lost(self, died: LaneDied) -> None:
        """The call ran, but its answer died with its worker (a cluster worker killed before its
        result was fetched): it runs again, unless ``rerun_innocent=False``; then it fails
        saying so, never retried (it must not run twice)."""
        if self.ctx.policy.rerun_innocent:
            # From a timer thread, as a retry: a resend pickles the call (see _answer).
            threading.Timer(0.0, self._resend).start()
        else:
            self._settle(None, death_failure(died, self.subject, "running", float("nan"))[1])

    def _settle(self, value: Any, error: BaseException | None) -> None:
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the caller meanwhile: the result is dropped
        self.call = self.task = None

    def _resend(self) -> None:
        try:
            self._send()
        except BaseException as exc:  # EngineClosed, or a callable timeout's own exception
            self._settle(None, exc)

    def _decode(self, task: Task, result: TaskResult) -> tuple[Kind, Any, BaseException | None]:
        if isinstance(result, LaneDied):
            seconds = task.timeouts[0] if task.timeouts else float("nan")
            kind, error = death_failure(result, self.subject, "running", seconds)
            return kind, None, error
        try:
            # A share of a bundle's answer is decoded already, or is the bundle's decode error.
            if isinstance(result, Exception):
                raise result
            answer: ChunkResult = (result if isinstance(result, ChunkResult)
                                   else self.ctx.backend.codec.decode(result))
        except Exception as exc:
            return "serialization", None, unpickled_result_error(self.subject, exc)
        if self.call is not None:
            self.ctx.learn(self.call[0], answer.stamps[-1] - answer.stamps[0])
        if answer.errors:
            kind, error, _tb = rebuild_error(answer.errors[0], self.subject)
            return kind, None, error
        return "ok", answer.values[0], None


def _when_done(single: weakref.ref[Single], future: concurrent.futures.Future[Any]) -> None:
    alive = single()
    if alive is not None:
        alive._maybe_withdraw(future)


class ExecutorView(concurrent.futures.Executor):
    """The engine as a standard Executor: ``submit``/``map``/``shutdown`` with the semantics of
    ``concurrent.futures.ProcessPoolExecutor`` (a dead worker fails only its call).

    ``submit_fn`` and ``shutdown_fn`` are the engine's own methods (this view holds no engine,
    so it imports none)."""

    def __init__(self, submit_fn: Callable[..., concurrent.futures.Future[Any]],
                 shutdown_fn: Callable[..., None]) -> None:
        self._submit, self._shutdown = submit_fn, shutdown_fn

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker: see ``Engine.submit``."""
        return self._submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[R]:
        """Like ``ProcessPoolExecutor.map``: the iterables are read and every call submitted
        here, at once (so a ``shutdown()`` right after still runs them all); results come in
        order, an exception is raised when its result is reached.

        ``timeout``: a deadline counted from this call; ``TimeoutError`` is raised when it passes,
        even while a call still runs. ``chunksize``: this many calls travel to a worker together
        (the first exception fails its whole chunk, as in the standard library); ``ValueError``
        below 1. Leaving the iterator early (an exception, the timeout, dropping it) cancels the
        calls that have not started; the iterator holds no result it has yielded.
        """
        if check_int(chunksize, "chunksize", minimum=1) == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = super().map(functools.partial(call_chunk, fn),
                             _batched(zip(*iterables, strict=False), chunksize), timeout=timeout)
        return _flatten(cast(Generator[list[R], None, None], chunks))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the engine: see ``Engine.shutdown``."""
        self._shutdown(wait, cancel_futures=cancel_futures)


def _batched(pairs: Iterator[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(pairs, n)):
        yield chunk


def _flatten(chunks: Generator[list[R], None, None]) -> Iterator[R]:
    """The chunks' results one by one; a result is dropped from the chunk as it is yielded, so
    the caller alone decides how long it lives (as the standard library's own iterator does)."""
    try:
        for chunk in chunks:
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        chunks.close()  # the calls not yet started are cancelled now, not when collected
