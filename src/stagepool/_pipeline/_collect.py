"""Running a pipeline's flow to its end: the report of ``run`` and ``run_async``, the stream of
``run_iter``. Imported at the first pipeline call (``_calls``), so that a script that never runs a
pipeline does not import the pipeline layer."""

from __future__ import annotations

import time
from collections.abc import Iterator

from ._flow import Flow
from ._report import PipelineAborted, PipelineReport, SegmentOutcome

__all__ = ["collect", "outcomes_of"]


def outcomes_of(flow: Flow, engine: object) -> Iterator[SegmentOutcome]:
    """``engine`` is held while the stream lives: a caller may hold only the stream (_abandon)."""
    yield from flow.outcomes()


def collect(flow: Flow, max_failure_ratio: float | None) -> PipelineReport:
    """Run the flow to the end (or to ``max_failure_ratio``) and build its report."""
    started = time.perf_counter()
    segments: list[SegmentOutcome] = []
    names = flow.order
    stream = flow.outcomes()
    failed = 0
    try:
        for seg in stream:
            segments.append(seg)
            failed += not seg.ok
            if max_failure_ratio is not None and _over(failed, len(segments), flow.total,
                                                       max_failure_ratio):
                stream.close()
                report = _report(segments, names, started)
                raise PipelineAborted(
                    f"{failed} of {len(segments)} finished segments failed, more than "
                    f"max_failure_ratio={max_failure_ratio:g} allows"
                    f"{f' of {flow.total}' if flow.total is not None else ''}: the run stopped "
                    f"early; the partial report is .report. First failure: {_first(segments)}",
                    report)
    except BaseException as exc:
        if exc is flow.source_error:
            exc.report = _report(segments, names, started)  # type: ignore[attr-defined]
            exc.add_note(f"stagepool: the items iterable raised after {flow.fed} segments; "
                         "the partial report is attached as .report")
        raise
    return _report(segments, names, started)


def _report(segments: list[SegmentOutcome], names: list[str], started: float) -> PipelineReport:
    return PipelineReport(sorted(segments, key=lambda s: s.index), names,
                          time.perf_counter() - started)


def _first(segments: list[SegmentOutcome]) -> str:
    seg = next(s for s in segments if not s.ok)
    return f"segment {seg.index}, stage {seg.stage!r} [{seg.kind}]: {seg.error!r}"


def _over(failed: int, finished: int, total: int | None, ratio: float) -> bool:
    if total is not None:
        return failed > ratio * total  # the run can no longer end within the ratio
    return finished >= 10 and failed > ratio * finished
