"""The engine's pipeline calls (``Engine`` inherits :class:`PipelineCalls`): validate the
options into a :class:`FlowOptions`, then run a :class:`Flow` in this thread (``run``,
``run_iter``: ``_collect``) or in a helper thread (the async calls, in ``_async``). The flow's
modules are imported at the first pipeline call: ``import stagepool`` and an engine that only
maps do not pay for them (~20-30 ms of a short script's start-up)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from .._bridge import check_on_cancel
from .._config import EngineConfig, check_bool, check_positive_int
from .._costs import cost_hints
from .._progress import Progress, check_progress_options

if TYPE_CHECKING:  # the rest of the pipeline layer is imported at the first pipeline call
    from .._answers import BatchPolicy
    from .._backends import Backend
    from ._async import SegmentStream
    from ._declare import Pipeline
    from ._flow import Flow
    from ._report import PipelineReport, SegmentOutcome

__all__ = ["PipelineCalls"]

# Segments in flight per worker and per group by default: enough to keep every worker fed in
# every group while results travel; more only holds memory (window x segment size).
WINDOW_PER_WORKER = 4


class PipelineCalls:
    """``run``, ``run_iter``, ``run_async`` and ``run_iter_async`` of ``Engine``."""

    config: EngineConfig
    _policy: BatchPolicy

    if TYPE_CHECKING:  # provided by Engine
        def _backend_or_raise(self) -> Backend: ...

    def _flow(self, pipeline: Pipeline, items: Any, *, ordered: bool, window: int | None,
              progress: bool | None, desc: str | None, kill: bool = False,
              on_progress: Callable[[Progress], object] | None = None,
              cost: Callable[[Any], float] | None = None) -> Flow:
        """Validate one call (before anything starts) into its flow."""
        from ._declare import Pipeline, plan_groups
        from ._flow import Flow, FlowOptions

        if not isinstance(pipeline, Pipeline):
            raise TypeError(f"pipeline must be a stagepool.Pipeline, not {type(pipeline).__name__}")
        if not pipeline.stages:
            raise ValueError("the pipeline has no stages: declare some with pipeline.stage()")
        if not hasattr(items, "__iter__") and not hasattr(items, "__aiter__"):
            raise TypeError(f"items must be iterable, not {type(items).__name__}")
        check_bool(ordered, "ordered")
        check_positive_int(window, "window", allow_none=True)
        check_progress_options(progress=progress, on_progress=on_progress, desc=desc)
        hints = cost_hints(cost=cost, size=None, unit=None, lookahead=None, stream=False)
        backend = self._backend_or_raise()
        groups = len(plan_groups(pipeline.stages))
        options = FlowOptions(
            window or WINDOW_PER_WORKER * backend.workers * min(groups, 4), ordered,
            self.config.chunk_size, self._policy, kill,
            self.config.progress if progress is None else progress, desc, on_progress, hints)
        return Flow(backend, pipeline, items, options)

    def run(self, pipeline: Pipeline, items: Iterable[Any], *, window: int | None = None,
            max_failure_ratio: float | None = None, cost: Callable[[Any], float] | None = None,
            progress: bool | None = None, desc: str | None = None,
            on_progress: Callable[[Progress], object] | None = None) -> PipelineReport:
        """Run every segment of ``items`` through ``pipeline``; one :class:`PipelineReport`.

        Never raises because a segment failed: its outcome names the stage, the kind and the
        error, and the stages after it are ``"skipped"``. ``window``: segments in flight at once
        (default 4 per worker and group, at most 16 per worker): the parent's memory is bounded
        by it, and ``items`` is read only as fast as segments finish. ``max_failure_ratio``
        (0..1): stop as soon as more segments have failed than that share of the input (for an
        iterable of unknown length: of the segments finished, once 10 have), raising
        :class:`PipelineAborted` with the partial report.

        ``cost``: a callable of the segment giving a number >= 0 that predicts its time (e.g.
        ``lambda seg: seg.seconds``): segments enter longest-first (a known-length input all
        sorted; otherwise in blocks of 8 per worker), so the run does not end on a long
        straggler; the report stays in input order. A segment whose ``cost`` raises or is not a
        number >= 0 fails alone, at its first stage, with an error naming it; it never runs.

        Progress: ``progress=True`` shows one bar per stage (a plain line on a log file), with
        the ETA of the slowest stage; ``on_progress(Progress)`` is called, from the run's
        threads and one call at a time, whenever a stage finishes a segment; its ``stages``
        holds each stage's counts. A callback that raises is logged once and dropped.

        If ``items`` raises, the segments taken finish and its exception propagates with the
        partial report as ``.report``.

        Cancellation: Ctrl-C kills the running segments and propagates; segments not started
        never start. Shutdown from another thread: the segments that never ran are
        ``"cancelled"``.
        """
        _refuse_async_items(items)
        ratio = _check_ratio(max_failure_ratio)
        flow = self._flow(pipeline, items, ordered=False, window=window, progress=progress,
                          desc=desc, on_progress=on_progress, cost=cost)
        from ._collect import collect

        return collect(flow, ratio)

    def run_iter(self, pipeline: Pipeline, items: Iterable[Any], *, ordered: bool = True,
                 window: int | None = None, progress: bool | None = None,
                 desc: str | None = None,
                 on_progress: Callable[[Progress], object] | None = None,
                 ) -> Iterator[SegmentOutcome]:
        """Stream each segment's :class:`SegmentOutcome` as it finishes (in input order when
        ``ordered``): memory stays flat for an endless ``items`` (at most ``window`` segments in
        flight, held-back ones included). Nothing starts until the first ``next``. Progress
        options as in :meth:`run`.

        Cancellation: closing the iterator (``break``, ``close()``) stops the run: segments not
        started never start, running ones finish unobserved. Ctrl-C kills them."""
        _refuse_async_items(items)
        flow = self._flow(pipeline, items, ordered=ordered, window=window, progress=progress,
                          desc=desc, on_progress=on_progress)
        from ._collect import outcomes_of

        return outcomes_of(flow, self)

    async def run_async(self, pipeline: Pipeline, items: Iterable[Any] | AsyncIterable[Any], *,
                        window: int | None = None, max_failure_ratio: float | None = None,
                        cost: Callable[[Any], float] | None = None,
                        on_cancel: Literal["finish", "kill"] = "finish",
                        progress: bool | None = None, desc: str | None = None,
                        on_progress: Callable[[Progress], object] | None = None,
                        ) -> PipelineReport:
        """Awaitable :meth:`run`; ``items`` may be an async iterable. The event loop never
        blocks: the run goes on in a helper thread (``on_progress`` is called there).

        Cancellation: cancelling the awaiting task raises ``CancelledError`` at once; segments
        not started never start; running ones finish unobserved (``on_cancel="finish"``) or
        are killed with their workers, which are replaced (``"kill"``)."""
        ratio = _check_ratio(max_failure_ratio)
        flow = self._flow(pipeline, items, ordered=False, window=window, progress=progress,
                          desc=desc, kill=check_on_cancel(on_cancel), on_progress=on_progress,
                          cost=cost)
        from ._async import run_async
        from ._collect import collect

        return await run_async(flow, items, lambda f: collect(f, ratio))

    def run_iter_async(self, pipeline: Pipeline, items: Iterable[Any] | AsyncIterable[Any], *,
                       ordered: bool = False, window: int | None = None,
                       on_cancel: Literal["finish", "kill"] = "finish",
                       progress: bool | None = None, desc: str | None = None,
                       on_progress: Callable[[Progress], object] | None = None,
                       ) -> SegmentStream:
        """``async for seg in engine.run_iter_async(p, items)``: outcomes as they finish.

        Cancellation: leaving the loop (``break``, ``aclose()``, the end of ``async with``) or
        cancelling the consuming task stops the run at once; running segments follow
        ``on_cancel`` as in :meth:`run_async`."""
        flow = self._flow(pipeline, items, ordered=ordered, window=window, progress=progress,
                          desc=desc, kill=check_on_cancel(on_cancel), on_progress=on_progress)
        from ._async import run_iter_async

        return run_iter_async(flow, items, self)


def _check_ratio(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"max_failure_ratio must be a number from 0 to 1, or None; got {value!r}")
    return float(value)


def _refuse_async_items(items: object) -> None:
    if hasattr(items, "__aiter__") and not hasattr(items, "__iter__"):
        raise TypeError(f"items is an async iterable ({type(items).__name__}): use run_async "
                        "or run_iter_async, or pass a plain iterable")
