"""The pipeline's async calls, on the asyncio bridge's plumbing (``_bridge``, ``_aio``): the run
goes on in a pooled helper thread, an async source is stepped on the loop and read by the
flow's feeder, and a cancel stops the flow without waiting for anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .._aio import OutcomeStream, _Stream
from .._bridge import Call, post
from .._lazy import LazyModule
from ._flow import Flow
from ._report import SegmentOutcome

if TYPE_CHECKING:
    import asyncio
else:  # as in _aio: a script that never awaits does not pay for importing asyncio
    asyncio = LazyModule("asyncio", globals())

__all__ = ["SegmentStream", "run_async", "run_iter_async"]

T = TypeVar("T")


class _FlowCall(Call):
    """A bridge call whose cancel also stops its flow (every group's batch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flow: Flow) -> None:
        super().__init__(loop, "kill" if flow.options.kill else "finish")
        self.flow = flow

    def cancel(self) -> None:
        super().cancel()
        self.flow.stop()


async def run_async(flow: Flow, items: Any, body: Callable[[Flow], T]) -> T:
    """Run ``body(flow)`` in a helper thread; see ``PipelineCalls.run_async``."""
    call = _FlowCall(asyncio.get_running_loop(), flow)
    flow.items = call.source(items)

    def work() -> T:
        if call.cancelled:  # cancelled while it waited for a thread: start nothing
            raise asyncio.CancelledError
        return body(flow)

    return await call.awaited(work)


class _Segments(_Stream[Any]):
    """The state a SegmentStream shares with its thread: ``_aio``'s stream state (credits,
    delivery, end, cancel), fed by the flow's outcomes instead of one batch's."""

    def __init__(self, flow: Flow, items: Any) -> None:
        super().__init__(None, items, None, ordered=flow.options.ordered,  # type: ignore[arg-type]
                         on_cancel="kill" if flow.options.kill else "finish")
        self.flow = flow

    def start(self) -> None:
        call = self.call = _FlowCall(asyncio.get_running_loop(), self.flow)
        self.flow.items, self.items = call.source(self.items), None
        call.run(lambda: self._pump(call))

    def _pump(self, call: Call) -> None:
        stream = None
        try:
            if call.cancelled:
                return
            stream = self.flow.outcomes()
            for seg in stream:
                if not self.credit(call):
                    break
                post(call.loop, self.deliver, [seg])
        except BaseException as exc:
            post(call.loop, self.end, exc)
        else:
            post(call.loop, self.end, None)
        finally:
            if stream is not None:
                stream.close()


class SegmentStream:
    """The async iterator of ``Engine.run_iter_async``: each :class:`SegmentOutcome` as it
    finishes; also an async context manager that stops the run when its block ends."""

    def __init__(self, flow: Flow, items: Any, engine: object = None) -> None:
        self._inner: OutcomeStream[Any] = OutcomeStream(_Segments(flow, items))
        self._engine = engine  # held while the stream lives: a caller may hold only the stream

    def __aiter__(self) -> SegmentStream:
        return self

    async def __anext__(self) -> SegmentOutcome:
        return cast(SegmentOutcome, await self._inner.__anext__())

    async def aclose(self) -> None:
        """Stop now: segments not started never start; running ones follow ``on_cancel``."""
        await self._inner.aclose()

    async def __aenter__(self) -> SegmentStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_iter_async(flow: Flow, items: Any, engine: object = None) -> SegmentStream:
    return SegmentStream(flow, items, engine)


for _public in (SegmentStream,):
    _public.__module__ = "stagepool"
