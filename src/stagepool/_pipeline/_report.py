"""What a pipeline run gives back: one SegmentOutcome per segment (one StageOutcome per stage)
and the PipelineReport of the whole run, with per-stage statistics."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple, overload

from .._errors import StagepoolError

__all__ = ["PipelineAborted", "PipelineReport", "SegmentOutcome", "StageKind", "StageOutcome",
           "StageStats"]

StageKind = Literal["ok", "error", "timeout", "crash", "serialization", "cancelled", "skipped"]


class StageOutcome(NamedTuple):
    """How one stage went for one segment.

    ``kind`` is an :class:`Outcome` kind, or ``"skipped"``: the stage did not run because
    ``cause`` (a stage it reads, directly or not) failed, or because its fused group's worker
    died while ``cause`` was running, before it got to run (the stages of the group that ran
    before ``cause`` read how they ended, "ok" or "error", what they raised lost with the
    worker). ``duration`` is seconds in the worker, ``attempts`` how many times it really ran
    (a stage killed while running, "cancelled", ran once more)."""

    stage: str
    kind: StageKind
    error: Exception | None = None
    duration: float = 0.0
    attempts: int = 0
    cause: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


class SegmentOutcome(NamedTuple):
    """The single result of one segment: ``value`` (the leaf's output; several leaves: a dict by
    name) when every stage succeeded; otherwise ``stage`` names the first stage that failed,
    ``kind`` and ``error`` say how, and ``outputs`` holds the leaves that still succeeded (an
    independent branch goes on). ``stages`` has every stage's :class:`StageOutcome`."""

    index: int  # type: ignore[assignment]  # the field hides tuple.index, on purpose
    ok: bool
    value: Any
    kind: str
    stage: str | None
    error: Exception | None
    stages: dict[str, StageOutcome]
    outputs: dict[str, Any]

    def unwrap(self) -> Any:
        """The value, or raise the failing stage's error (noted with segment and stage)."""
        if self.error is not None:
            raise self.error
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class StageStats:
    """One stage over a run: segments per kind, busy time in workers, throughput."""

    stage: str
    counts: dict[str, int]
    busy_time: float
    wall_time: float

    @property
    def ran(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "skipped")

    @property
    def success_rate(self) -> float:
        """Ok / segments that reached the stage (skipped ones did not); 0.0 when none did."""
        return self.counts.get("ok", 0) / self.ran if self.ran else 0.0

    @property
    def items_per_second(self) -> float:
        """Successful runs per second of the run's wall time."""
        return self.counts.get("ok", 0) / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def mean_duration(self) -> float:
        return self.busy_time / self.ran if self.ran else 0.0


class PipelineReport(Sequence[SegmentOutcome]):
    """Every segment's :class:`SegmentOutcome` in input order, and per-stage statistics.

    ``values`` is aligned with the segments (None where a segment failed); ``successful`` and
    ``failed`` list outcomes; ``stages`` maps each stage to its :class:`StageStats`. Failures
    never raise by themselves: :meth:`raise_on_failure` raises them as an ``ExceptionGroup``.
    """

    def __init__(self, segments: list[SegmentOutcome], stage_names: Sequence[str],
                 wall_time: float) -> None:
        self._segments = segments
        self.wall_time = wall_time
        self.stages: dict[str, StageStats] = {
            name: _stage_stats(name, segments, wall_time) for name in stage_names}

    def __len__(self) -> int:
        return len(self._segments)

    @overload
    def __getitem__(self, i: int) -> SegmentOutcome: ...
    @overload
    def __getitem__(self, i: slice) -> list[SegmentOutcome]: ...
    def __getitem__(self, i: int | slice) -> SegmentOutcome | list[SegmentOutcome]:
        return self._segments[i]

    def __iter__(self) -> Iterator[SegmentOutcome]:
        return iter(self._segments)

    def __repr__(self) -> str:
        return f"<PipelineReport {len(self)} segments, {len(self.failed)} failed>"

    @property
    def values(self) -> list[Any]:
        """Each segment's value, aligned with the input (None where the segment failed)."""
        return [s.value for s in self._segments]

    @property
    def successful(self) -> list[SegmentOutcome]:
        return [s for s in self._segments if s.ok]

    @property
    def failed(self) -> list[SegmentOutcome]:
        return [s for s in self._segments if not s.ok]

    @property
    def success_rate(self) -> float:
        """Segments whose every stage succeeded / segments; 0.0 for an empty run."""
        return len(self.successful) / len(self) if self._segments else 0.0

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self._segments)

    def summary(self, *, max_failures: int = 5) -> str:
        """Counts, speed, one line per stage, and the first failures with segment and stage."""
        n, failed = len(self), self.failed
        rate = n / self.wall_time if self.wall_time > 0 else 0.0
        lines = [f"{n} segments: {n - len(failed)} ok, {len(failed)} failed "
                 f"({self.success_rate:.1%} success) in {self.wall_time:.2f} s "
                 f"({rate:,.1f} segments/s)"]
        for st in self.stages.values():
            kinds = ", ".join(f"{k} {c}" for k, c in sorted(st.counts.items()) if k != "ok")
            lines.append(f"  {st.stage}: {st.counts.get('ok', 0)} ok"
                         f"{', ' + kinds if kinds else ''}; busy {st.busy_time:.2f} s, "
                         f"mean {st.mean_duration * 1e3:.1f} ms, {st.items_per_second:,.1f}/s")
        for seg in failed[:max_failures]:
            lines.append(f"  segment {seg.index} failed in {seg.stage!r} [{seg.kind}]: "
                         f"{type(seg.error).__name__}: {seg.error}")
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more")
        return "\n".join(lines)

    def raise_on_failure(self) -> PipelineReport:
        """Raise an ``ExceptionGroup`` of the failed segments' errors (each noted with its
        segment and stage); return the report unchanged when every segment succeeded."""
        errors = [s.error for s in self.failed if s.error is not None]
        if errors:
            raise ExceptionGroup(f"{len(errors)} of {len(self)} segments failed", errors)
        return self


def _stage_stats(name: str, segments: list[SegmentOutcome], wall: float) -> StageStats:
    counts: Counter[str] = Counter()
    busy = 0.0
    for seg in segments:
        st = seg.stages.get(name)
        if st is not None:
            counts[st.kind] += 1
            busy += st.duration
    return StageStats(name, dict(counts), busy, wall)


class PipelineAborted(StagepoolError):
    """A run stopped early because more segments failed than ``max_failure_ratio`` allows.

    ``report`` is the partial :class:`PipelineReport` (the segments finished when it stopped)."""

    def __init__(self, message: str, report: PipelineReport) -> None:
        super().__init__(message)
        self.report = report


for _public in (PipelineAborted, PipelineReport, SegmentOutcome, StageOutcome, StageStats):
    _public.__module__ = "stagepool"
