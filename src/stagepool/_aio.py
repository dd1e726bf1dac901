"""The asyncio bridge: await batches without blocking the event loop.

The loop thread never pickles, waits on pipes or joins processes: each batch runs its feeding loop
in a helper thread (the same code as ``Engine.map``), and results come back to the loop through
``asyncio.wrap_future`` / ``call_soon_threadsafe``.

Cancellation: cancelling the task that awaits :func:`map_async` (or ``asyncio.wait_for`` timing it
out) raises ``CancelledError`` at once; the batch's chunks that have not started are withdrawn.
With ``on_cancel="finish"`` (default) items already running finish and their results are dropped;
with ``on_cancel="kill"`` their workers are killed and replaced. The engine stays usable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._engine import Engine
    from ._outcome import BatchReport, Outcome

__all__ = ["imap_async", "map_async", "shutdown_async", "submit_async"]

T = TypeVar("T")
R = TypeVar("R")
_ON_CANCEL = ("finish", "kill")


def _check_on_cancel(on_cancel: str) -> None:
    if on_cancel not in _ON_CANCEL:
        raise ValueError(f"on_cancel must be 'finish' or 'kill', got {on_cancel!r}")


async def map_async(
    engine: Engine, fn: Callable[[T], R], items: Any, *, on_cancel: str = "finish", **kwargs: Any
) -> BatchReport[R]:
    """Awaitable ``Engine.map``: same arguments, same report. See the module doc for cancellation."""
    from ._engine import _run_to_report

    _check_on_cancel(on_cancel)
    batch = engine._batch(fn, items, chunk_size=kwargs.pop("chunk_size", None),
                          progress=kwargs.pop("progress", None), desc=kwargs.pop("desc", None),
                          on_progress=kwargs.pop("on_progress", None),
                          timeout=kwargs.pop("timeout", ...))
    if kwargs:
        raise TypeError(f"map_async() got unexpected keyword arguments {sorted(kwargs)}")
    runner: concurrent.futures.Future[BatchReport[R]] = concurrent.futures.Future()

    def run() -> None:
        try:
            runner.set_result(_run_to_report(batch))
        except BaseException as exc:
            runner.set_exception(exc)

    _start_thread(run)
    try:
        return await asyncio.wrap_future(runner)
    except asyncio.CancelledError:
        batch.cancel(kill_running=on_cancel == "kill")
        raise


async def imap_async(
    engine: Engine, fn: Callable[[T], R], items: Any, *, ordered: bool = False,
    on_cancel: str = "finish", **kwargs: Any,
) -> AsyncIterator[Outcome[R]]:
    """Async iterator of outcomes as they finish. Leaving the loop early withdraws the rest."""
    from ._engine import _outcomes

    _check_on_cancel(on_cancel)
    loop = asyncio.get_running_loop()
    batch = engine._batch(fn, items, chunk_size=kwargs.pop("chunk_size", None),
                          progress=kwargs.pop("progress", None), desc=kwargs.pop("desc", None),
                          on_progress=kwargs.pop("on_progress", None),
                          timeout=kwargs.pop("timeout", ...))
    out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = False

    def run() -> None:
        try:
            for outcome in _outcomes(batch, ordered):
                if stop:
                    break
                loop.call_soon_threadsafe(out.put_nowait, ("item", outcome))
            loop.call_soon_threadsafe(out.put_nowait, ("end", None))
        except BaseException as exc:
            loop.call_soon_threadsafe(out.put_nowait, ("error", exc))

    _start_thread(run)
    try:
        while True:
            what, payload = await out.get()
            if what == "item":
                yield payload
            elif what == "end":
                return
            else:
                raise payload
    finally:
        stop = True
        batch.cancel(kill_running=on_cancel == "kill")


async def submit_async(engine: Engine, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Awaitable ``Engine.submit``: the value, or the task's exception. Cancelling the await
    cancels the task if it has not started."""
    future = engine.submit(fn, *args, **kwargs)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


async def shutdown_async(engine: Engine, *, cancel_futures: bool = False) -> None:
    """``Engine.shutdown`` from async code: the joining happens in a helper thread."""
    await asyncio.to_thread(engine.shutdown, True, cancel_futures=cancel_futures)


def _start_thread(target: Callable[[], None]) -> None:
    import threading

    threading.Thread(target=target, name="stagepool-batch", daemon=True).start()
