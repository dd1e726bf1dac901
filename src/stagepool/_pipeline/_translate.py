"""The parent side of a group: what its task's outcome means for each of its stages.

    outcome ok    -> the runner's GroupResult: one record per stage (errors rebuilt with the
                     worker's traceback as __cause__), the values later groups read; a stage's
                     attempts add the earlier runs of the group that reached it (a dead
                     worker's breadcrumb says where its run stopped)
    outcome crash / timeout (the worker died or was killed)
                  -> the breadcrumb names the stage that was running: it gets the kind and the
                     error; the stages before it read as the breadcrumb's slots say ("ok", or
                     "error" with what they raised lost; the ones it reads ran fine, said or
                     not), the group's other stages are "skipped" because of it
    outcome serialization / error (the segment or a value could not travel, a runner bug)
                  -> the group's first stage that could run gets it; a result that would not
                     travel back: the first stage whose value the task sends back; a task that
                     would not travel: the first stage whose callables will not pickle
                     (a stage value that will not pickle usually arrives as an ok outcome:
                     the worker sends the rest, that stage's record saying "serialization",
                     see ``GroupResult._stagepool_salvage``)
    outcome cancelled -> every stage of the group that could run: "cancelled", but the stages
                     that the breadcrumb's stage reads (killed mid-group: they ran, "ok")
    refused at the door (its cost= could not be measured: ``refuse``)
                  -> every stage reading the segment itself gets the error, the rest "skipped"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .._failures import rebuild_error
from .._outcome import Outcome
from ._declare import StageSpec
from ._report import SegmentOutcome, StageOutcome
from ._runner import Carry, Crumb, GroupResult, StageRecord, dead_runs, read_crumb

__all__ = ["Segment", "absorb", "cancel", "finish", "refuse"]


@dataclasses.dataclass(slots=True)
class Segment:
    """One segment's state in the parent while it flows through the groups."""

    index: int
    values: dict[str, Any]  # outputs later groups read, and the leaves'
    stages: dict[str, StageOutcome] = dataclasses.field(default_factory=dict)
    blocked: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> failing stage

    def carry(self, reads: frozenset[str]) -> Carry:
        return Carry({k: v for k, v in self.values.items() if k in reads}, dict(self.blocked),
                     self.index)


def absorb(seg: Segment, stages: Sequence[StageSpec], outcome: Outcome[Any],
           crumbs: str | None, suspects: frozenset[str] = frozenset(), group: int = 0) -> None:
    """Record what the group's task (the run's ``group``-th) did for this segment
    (``suspects``: the stages a serialization failure may come from, see ``Flow.suspects``)."""
    if outcome.ok:
        result: GroupResult = outcome.value  # type: ignore[assignment]
        earlier = _earlier_runs(crumbs, group, seg.index, outcome.attempts, len(stages))
        for spec, runs in zip(stages, earlier, strict=True):
            _record(seg, spec.name, result.records[spec.name], runs)
        seg.values.update(result.values)
        return
    runnable = [s for s in stages if _cause(seg, s) is None]
    for spec in stages:
        cause = _cause(seg, spec)
        if cause is not None:
            _set(seg, StageOutcome(spec.name, "skipped", cause=cause), cause)
    if not runnable:
        return
    crumb = (read_crumb(crumbs, outcome.worker, group, seg.index)
             if crumbs is not None and outcome.kind in ("crash", "timeout", "cancelled") else None)
    at = None if crumb is None else crumb.stage
    counts = None
    if crumb is not None and at is not None and at < len(stages):
        counts = _runs(crumbs, group, seg.index, outcome.attempts, len(stages))
        runnable = _before(seg, stages, crumb, runnable, counts, outcome.kind)
    if outcome.kind == "cancelled":
        for spec in runnable:
            _set(seg, StageOutcome(spec.name, "cancelled", outcome.error,
                                   attempts=_killed_runs(spec, stages, at, counts, outcome)),
                 spec.name)
        return
    culprit, known = _culprit(runnable, stages, outcome, at, suspects)
    error = outcome.error
    if error is not None and outcome.kind == "timeout" and len(stages) > 1:
        limits = " + ".join(f"{s.name} {s.timeout:g} s" for s in stages)
        error.add_note(f"stagepool: the fused stages share one limit, the sum of their "
                       f"timeouts ({limits}); give a stage fuse=False for a limit of its own")
    if error is not None and not known and len(runnable) > 1:
        names = ", ".join(s.name for s in runnable)
        error.add_note(f"stagepool: while running one of the fused stages {names} (which one "
                       "is unknown: the worker could not say)")
    attempts = outcome.attempts if counts is None or not known else counts[stages.index(culprit)]
    _set(seg, StageOutcome(culprit.name, outcome.kind, _noted(error, seg.index, culprit.name),
                           outcome.duration, attempts), culprit.name)
    for spec in runnable:
        if spec is not culprit:
            _set(seg, StageOutcome(spec.name, "skipped", cause=culprit.name), culprit.name)


def refuse(seg: Segment, stages: Sequence[StageSpec], error: Exception) -> None:
    """The segment never runs (``error`` says why): its root stages fail with ``error``, every
    other stage is skipped because of the root it reads (directly or not)."""
    for spec in stages:
        cause = _cause(seg, spec)
        if cause is not None:
            _set(seg, StageOutcome(spec.name, "skipped", cause=cause), cause)
        else:  # a stage with nothing blocked upstream reads only the segment
            _set(seg, StageOutcome(spec.name, "error", _noted(error, seg.index, spec.name)),
                 spec.name)


def cancel(seg: Segment, stages: Sequence[StageSpec], error: Exception) -> None:
    """The run ended before the segment was through (the engine was shut down under it): each
    stage it had not reached is ``"cancelled"`` with ``error``, one that reads a failed stage
    ``"skipped"``."""
    left = [spec for spec in stages if spec.name not in seg.stages]
    absorb(seg, left, Outcome(seg.index, False, None, error, "cancelled", None, 0.0, None, 0),
           None)


_ENDED = {"crash": "died", "timeout": "was stopped at its time limit",
          "cancelled": "was stopped (the engine was shut down)"}


def _before(seg: Segment, stages: Sequence[StageSpec], crumb: Crumb, runnable: list[StageSpec],
            counts: list[int], kind: str) -> list[StageSpec]:
    """Record the stages that ran before the one the worker ended in (how: the outcome's
    ``kind``), as its breadcrumb says: "ok", or "error" (what it raised was lost with the
    worker), with ``counts`` runs, then those reading a failed one "skipped"; the stages the
    last one reads ran fine, said or not. Returns the rest."""
    ran = _ran_before(stages, crumb.stage, runnable)
    lost: list[StageSpec] = []
    for j, (how, _) in enumerate(crumb.ended):
        if stages[j] in runnable and how == "ok":
            ran.add(stages[j].name)
        elif stages[j] in runnable and how == "failed":
            lost.append(stages[j])
    for j, spec in enumerate(stages):
        if spec.name in ran:
            _set(seg, StageOutcome(spec.name, "ok", attempts=counts[j]), None)
        elif spec in lost:
            error = RuntimeError(
                f"stage {spec.name!r} failed in the worker, which then {_ENDED.get(kind, 'ended')}"
                f" in stage {stages[crumb.stage].name!r}: what {spec.name!r} raised was lost "
                "with it")
            _set(seg, StageOutcome(spec.name, "error", _noted(error, seg.index, spec.name),
                                   attempts=counts[j]), spec.name)
        elif spec in runnable and (cause := _cause(seg, spec)) is not None:
            _set(seg, StageOutcome(spec.name, "skipped", cause=cause), cause)
    return [s for s in runnable if s.name not in seg.stages]


def _ran_before(stages: Sequence[StageSpec], at: int | None,
                runnable: list[StageSpec]) -> set[str]:
    """The stages of the group that the stage running at position ``at`` (from its worker's
    breadcrumb) reads, directly or not: a stage runs only when its inputs did, so they ran
    fine, whatever became of their values."""
    if at is None or at >= len(stages) or stages[at] not in runnable:
        return set()
    names = {s.name for s in stages}
    ran: set[str] = set()
    wanted = [d for d in stages[at].after if d in names]
    while wanted:
        name = wanted.pop()
        if name not in ran:
            ran.add(name)
            wanted.extend(d for d in next(s for s in stages if s.name == name).after
                          if d in names)
    return ran


def _runs(crumbs: str | None, group: int, index: int, attempts: int, n_stages: int) -> list[int]:
    """How often each stage of the group ran over all ``attempts`` runs of a segment whose
    last run died too (``_earlier_runs`` counts the runs before the last one)."""
    return _earlier_runs(crumbs, group, index, attempts + 1, n_stages)


def _killed_runs(spec: StageSpec, stages: Sequence[StageSpec], at: int | None,
                 counts: list[int] | None, outcome: Outcome[Any]) -> int:
    """The runs of a stage cancelled with its segment: the one a kill stopped (its breadcrumb
    says which, or it is the group's only stage) ran, as an item killed while running did."""
    if counts is not None and at is not None and stages[at] is spec:
        return counts[at]
    return outcome.attempts if len(stages) == 1 else 0


def _culprit(runnable: list[StageSpec], stages: Sequence[StageSpec], outcome: Outcome[Any],
             at: int | None, suspects: frozenset[str]) -> tuple[StageSpec, bool]:
    """The stage that was running when the worker died or was killed (``at``, from its
    breadcrumb); for a serialization failure, the first suspect."""
    if at is not None and at < len(stages) and outcome.kind in ("crash", "timeout"):
        return stages[at], True
    if outcome.kind == "serialization":
        named = [s for s in runnable if s.name in suspects]
        if named:
            return named[0], len(named) == 1
    return runnable[0], len(runnable) == 1


def _cause(seg: Segment, spec: StageSpec) -> str | None:
    return next((seg.blocked[d] for d in spec.after if d in seg.blocked), None)


def _earlier_runs(crumbs: str | None, group: int, index: int, attempts: int,
                  n_stages: int) -> list[int]:
    """How often each stage of the group ran in the segment's earlier attempts, whose results
    were lost: one whose worker died mid-group ran what its breadcrumb says (the stages before
    the one it died in with their retries, that one at least once); any other (finished, its
    answer lost with its worker) ran them all once."""
    earlier = attempts - 1
    died = dead_runs(crumbs, group, index, n_stages)[:earlier] if crumbs and earlier > 0 else []
    finished = earlier - len(died)
    return [finished + sum(runs[j] for runs in died) for j in range(n_stages)]


def _record(seg: Segment, name: str, rec: StageRecord, earlier: int) -> None:
    error: Exception | None = None
    if rec.error is not None:
        _kind, error, _tb = rebuild_error(rec.error, seg.index)
        error = _noted(error, seg.index, name)
    stage_kind: Any = rec.kind
    # A re-run of the whole group (its worker died) ran the stage again: count those runs.
    runs = rec.attempts + (earlier if rec.attempts else 0)
    outcome = StageOutcome(name, stage_kind, error, rec.duration, runs, rec.cause)
    _set(seg, outcome, None if rec.kind == "ok" else (rec.cause or name))


def _set(seg: Segment, outcome: StageOutcome, blocked_by: str | None) -> None:
    seg.stages[outcome.stage] = outcome
    if blocked_by is not None:
        seg.blocked[outcome.stage] = blocked_by


def _noted(error: Exception | None, index: int, stage: str) -> Exception | None:
    if error is not None:
        note = f"stagepool: segment {index}, stage {stage!r}"
        if note not in getattr(error, "__notes__", ()):
            error.add_note(note)
    return error


def finish(seg: Segment, order: Sequence[str], leaves: Sequence[str]) -> SegmentOutcome:
    """The segment's outcome once every group is done with it."""
    first = next((seg.stages[n] for n in order if seg.stages[n].kind != "ok"), None)
    outputs = {name: seg.values[name] for name in leaves if name in seg.values}
    if first is None:
        value = outputs[leaves[0]] if len(leaves) == 1 else outputs
        return SegmentOutcome(seg.index, True, value, "ok", None, None, seg.stages, outputs)
    failed = seg.stages[first.cause] if first.kind == "skipped" and first.cause else first
    return SegmentOutcome(seg.index, False, None, failed.kind, failed.stage, failed.error,
                          seg.stages, outputs)
