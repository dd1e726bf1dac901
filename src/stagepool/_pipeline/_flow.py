"""Running a pipeline: one batch per group on the engine's backend, linked by inboxes.

    items --feeder thread (admits a segment only while fewer than ``window`` are in flight;
            in input order, or longest-first with ``cost=``: _admit)-->
      Inbox 0 --Batch(group 0's runner)--> group thread 0 --absorb--> Inbox 1 --> ... -->
      group thread n-1 --> finished queue --> the caller's thread: SegmentOutcome (reordered
      when ``ordered``); each one it hands out admits the next segment
    each group's absorb --> StageMeter (_meter): per-stage progress, bars, on_progress

Every group's batch runs at the same time on the same backend (its fair share between batches
keeps each group served), and never blocks on its inbox: it takes what is there and is woken
when more arrives, so it keeps draining its answers meanwhile. Memory is set by the window:
segments are admitted only as fast as finished ones leave (drain before fill), so the input is
read, and the upstream groups run, only as fast as the consumer takes results.

Stopping (the consumer closes the stream, Ctrl-C, an async cancel): no segment is admitted any
more, every batch is abandoned (chunks not started are withdrawn; running ones finish unobserved,
or are killed with ``kill``), and the threads leave.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any

from .._answers import BatchPolicy
from .._backends import Backend
from .._batch import Batch, BatchSpec
from .._costs import CostHints
from .._errors import TaskCancelled
from .._planning import plan_workers
from .._progress import Progress
from .._streams import outcome_lists
from .._transport import dumps_plain
from ._admit import admission
from ._declare import INPUT, Group, Pipeline, StageSpec, plan_groups
from ._meter import StageMeter, make_meter
from ._report import SegmentOutcome
from ._runner import GroupRunner, StageCall
from ._translate import Segment, absorb, cancel, finish, refuse

__all__ = ["Flow", "FlowOptions"]

WAIT_SLICE = 0.2  # seconds a thread blocks at most before it looks at "stopped" again
_END = -1


@dataclasses.dataclass(frozen=True, slots=True)
class FlowOptions:
    """One run's validated options (the engine's defaults already applied)."""

    window: int  # segments admitted and not yet handed out
    ordered: bool
    chunk_size: int | None  # fused groups' chunk size (None: automatic)
    policy: BatchPolicy  # the engine's: in-flight window, rerun_innocent
    kill: bool = False  # stopping kills running items
    progress: bool = False
    desc: str | None = None
    on_progress: Callable[[Progress], object] | None = None
    hints: CostHints | None = None  # cost=: segments admitted longest-first (_admit)


class Inbox:
    """A group's source: segments handed over by the feeder or the group before, read by the
    group's batch without blocking (``available``), which it wakes when more arrive."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[int, Any]] = collections.deque()
        self._closed = False
        self._taken = 0
        self.order: dict[int, int] = {}  # the batch's item index -> the segment's index
        self.wake: Any = None

    def put(self, segment: int, carry: Any) -> None:
        self._items.append((segment, carry))
        self._poke()

    def close(self) -> None:
        self._closed = True
        self._poke()

    def _poke(self) -> None:
        wake = self.wake
        if wake is not None:
            wake()

    def available(self) -> int:
        return len(self._items) + self._closed  # the end counts: the batch must see it

    def label(self, position: int) -> int:
        """The segment at a batch position, which its messages name (segments arrive in the
        order they finish upstream, so positions and segments differ after the first group)."""
        return self.order.get(position, position)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            segment, carry = self._items.popleft()
        except IndexError:
            raise StopIteration from None
        self.order[self._taken] = segment
        self._taken += 1
        return carry


class Flow:
    """One run of a pipeline over ``items``; iterate :meth:`outcomes` in the consumer thread."""

    def __init__(self, backend: Backend, pipeline: Pipeline, items: Iterable[Any],
                 options: FlowOptions) -> None:
        self.backend, self.options = backend, options
        self.specs = pipeline.stages
        self.order = [s.name for s in self.specs]
        self.leaves = pipeline.leaves
        self.groups = plan_groups(self.specs)
        self.items = items
        self.total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        self.uid = pipeline.uid
        self.crumbs: str | None = None  # made when the run starts (a stream never read: none)
        self.reads, self.keep = _traffic(self.specs, self.groups, self.leaves)
        self.runners: list[GroupRunner] = []
        self.inboxes = [Inbox() for _ in self.groups]
        self.segments: dict[int, Segment] = {}
        self.finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.admit = threading.Condition()
        self.in_flight = 0
        self.fed = 0
        self.stopped = False
        self.failure: BaseException | None = None
        self.source_error: BaseException | None = None
        self.batches: list[Batch] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.meter: StageMeter | None = None  # made when the run starts
        self.unpicklable: dict[int, frozenset[str]] = {}  # group -> stages (suspects)
        # Segments handed out, for a sized input only (an endless one keeps no such set): what
        # the run never read once the engine shut down under it is cancelled (_cancel_left).
        self.handed: set[int] | None = set() if self.total is not None else None
        self.cut_short = False

    # ---- building ---------------------------------------------------------------------------------

    def _runner(self, uid: str, group: Group, i: int) -> GroupRunner:
        calls = tuple(_stage_call(self.specs[s]) for s in group.stages)
        later = set().union(*self.reads[i + 1:]) if i + 1 < len(self.reads) else set()
        emit = frozenset(c.name for c in calls if c.name in later or c.name in self.leaves)
        return GroupRunner(uid, calls, emit, self.crumbs, i)

    def _batch(self, i: int) -> Batch:
        group = [self.specs[s] for s in self.groups[i].stages]
        timed = self.backend.capabilities.hard_timeouts and all(s.timeout for s in group)
        spec = BatchSpec(
            self.runners[i], self.inboxes[i], None,
            group[0].chunk_size if not self.groups[i].fused else self.options.chunk_size,
            sum(s.timeout or 0.0 for s in group) if timed else None,
            _group_policy(group, self.options.policy), max_concurrent=_cap(group[0]))
        batch = Batch(self.backend, spec)
        with self.lock:
            self.batches.append(batch)
            stopped = self.stopped
        self.inboxes[i].wake = batch.wake
        if stopped:
            batch.abandon(kill_running=self.options.kill)
        return batch

    # ---- threads ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self.backend.capabilities.processes:  # in-process runs need no breadcrumbs
            self.crumbs = tempfile.mkdtemp(prefix="stagepool-pipe-")
        self.runners = [self._runner(self.uid, g, i) for i, g in enumerate(self.groups)]
        targets = [(self._feed, "feeder")] + [
            (lambda i=i: self._run_group(i), f"group-{i}") for i in range(len(self.groups))]
        for target, name in targets:
            thread = threading.Thread(target=target, name=f"stagepool-pipeline-{name}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def _feed(self) -> None:
        """Read the input, admitting one segment per free place in the window."""
        first = self.inboxes[0]
        order = admission(self.options.hints, self.items, self.total, self.backend.workers)
        try:
            for index, item, refusal in order:
                if not self._wait_for_room():
                    break
                seg = Segment(index, {INPUT: item})
                self.segments[seg.index] = seg
                self.fed += 1
                if refusal is not None:
                    self._refuse(seg, refusal)
                    continue
                first.put(seg.index, seg.carry(self.reads[0]))
                if INPUT not in self.keep[0]:
                    del seg.values[INPUT]  # only the task holds the segment now
                del item, seg
        except BaseException as exc:  # the caller's iterable failed: finish what was taken
            self.source_error = exc
        finally:
            order.close()
            first.close()

    def _refuse(self, seg: Segment, error: Exception) -> None:
        """A segment that never runs: its outcome now (the feeder's thread)."""
        seg.values.clear()
        refuse(seg, self.specs, error)
        self._metered(seg, self.order)
        self.finished.put(seg.index)

    def _metered(self, seg: Segment, names: Sequence[str]) -> None:
        if self.meter is not None:
            self.meter.stages_done(seg, names)
            self.meter.segment_done(seg)

    def _wait_for_room(self) -> bool:
        with self.admit:
            while self.in_flight >= self.options.window and not self.stopped:
                self.admit.wait(WAIT_SLICE)
            if self.stopped:
                return False
            self.in_flight += 1
            return True

    def _run_group(self, i: int) -> None:
        lists = outcome_lists(lambda: self._batch(i), ordered=False)
        try:
            for outcomes in lists:
                for outcome in outcomes:
                    self._after(i, outcome)
        except BaseException as exc:  # a bug, or the engine failed under us: stop loudly
            self.failure = self.failure or exc
        finally:
            lists.close()
            if i + 1 < len(self.groups):
                self.inboxes[i + 1].close()
            else:
                self.finished.put(_END)

    def _after(self, i: int, outcome: Any) -> None:
        seg = self.segments[self.inboxes[i].order.pop(outcome.index)]
        group = [self.specs[s] for s in self.groups[i].stages]
        absorb(seg, group, outcome, self.crumbs, self.suspects(i, outcome), i)
        if self.meter is not None:
            self.meter.stages_done(seg, [spec.name for spec in group])
        for name in [n for n in seg.values if n not in self.keep[i]]:
            del seg.values[name]  # nothing later reads it: free it now
        if i + 1 < len(self.groups):
            self.inboxes[i + 1].put(seg.index, seg.carry(self.reads[i + 1]))
        else:
            if self.meter is not None:
                self.meter.segment_done(seg)
            self.finished.put(seg.index)

    def suspects(self, i: int, outcome: Any) -> frozenset[str]:
        """The stages of group ``i`` a serialization failure may come from: those whose values
        its task sends back (it ran), or whose callables will not pickle (it never ran)."""
        if outcome.kind != "serialization" or outcome.attempts:
            return self.runners[i].emit
        if i not in self.unpicklable:  # tried once per group, on its first such failure
            self.unpicklable[i] = frozenset(
                c.name for c in self.runners[i].stages if not _pickles(c))
        return self.unpicklable[i]

    # ---- the consumer -----------------------------------------------------------------------------

    def outcomes(self) -> Generator[SegmentOutcome, None, None]:
        """Each segment's outcome as it finishes (in input order when ``ordered``). Closing the
        iterator stops the run; a failure of the items iterable propagates after the outcomes
        of the segments taken."""
        options = self.options
        self.meter = make_meter(self.order, self.total, progress=options.progress,
                                on_progress=options.on_progress,
                                desc=options.desc or "pipeline")
        try:
            self.start()
            yield from self._consume()
        except KeyboardInterrupt:
            self.stop(kill=True)
            raise
        finally:
            self.stop()
            self._join()
            if self.meter is not None:
                self.meter.close()
        if self.source_error is not None:
            raise self.source_error

    def _consume(self) -> Iterator[SegmentOutcome]:
        pending: dict[int, SegmentOutcome] = {}
        emitted = 0
        while True:
            index = self._next_finished()
            if index == _END:
                if self.failure is not None:
                    raise self.failure
                if self._cancel_left():
                    continue
                return
            outcome = finish(self.segments.pop(index), self.order, self.leaves)
            if self.handed is not None:
                self.handed.add(index)
            if not self.options.ordered:
                self._leave(1)
                yield outcome
                continue
            pending[index] = outcome
            while emitted in pending:
                self._leave(1)
                emitted += 1
                yield pending.pop(emitted - 1)

    def _next_finished(self) -> int:
        while True:
            if self.failure is not None:
                raise self.failure
            try:
                return self.finished.get(timeout=WAIT_SLICE)
            except queue.Empty:
                continue

    def _leave(self, n: int) -> None:
        with self.admit:
            self.in_flight -= n
            self.admit.notify()

    def _cancel_left(self) -> bool:
        """At the end: were segments left on their way? Then the engine was shut down under the
        run (its batches end with what they had taken, and the feeder would wait for room
        forever): stop the rest, and queue a ``"cancelled"`` outcome for each segment left and,
        for a sized input, each one never read, then the end again."""
        unread = self.total is not None and self.source_error is None and self.fed < self.total
        if self.cut_short or not (self.segments or unread):
            return False
        self.cut_short = True
        self.stop()
        self._join()  # the feeder and the groups add nothing more
        queued = _drain(self.finished)
        left = [i for i in self.segments if i not in queued]
        if unread and self.handed is not None:
            seen = self.handed.union(self.segments)
            left += [i for i in range(self.total or 0) if i not in seen]
        for index in left:
            seg = self.segments.setdefault(index, Segment(index, {}))
            names = [spec.name for spec in self.specs if spec.name not in seg.stages]
            cancel(seg, self.specs, TaskCancelled(
                f"segment {index} was cancelled before it finished: the engine was shut down "
                "during the run"))
            self._metered(seg, names)
        for index in [*queued, *left, _END]:
            self.finished.put(index)
        return True

    # ---- stopping ---------------------------------------------------------------------------------

    def stop(self, *, kill: bool | None = None) -> None:
        """From any thread, never blocks: admit nothing more, abandon every batch."""
        with self.lock:
            self.stopped = True
            batches = list(self.batches)
        with self.admit:
            self.admit.notify_all()
        for batch in batches:
            batch.abandon(kill_running=self.options.kill if kill is None else kill)
        for inbox in self.inboxes:
            inbox.close()

    def _join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=5 * WAIT_SLICE)  # the feeder may be stuck in the caller's items
        if self.crumbs is not None:
            shutil.rmtree(self.crumbs, ignore_errors=True)


def _drain(finished: queue.SimpleQueue[int]) -> list[int]:
    """The finished segments already queued (an end marker among them is dropped)."""
    got: list[int] = []
    while True:
        try:
            index = finished.get_nowait()
        except queue.Empty:
            return got
        if index != _END:
            got.append(index)


def _pickles(call: StageCall) -> bool:
    try:
        dumps_plain((call.fn, call.setup, call.teardown))
    except Exception:
        return False
    return True


def _stage_call(spec: StageSpec) -> StageCall:
    types = tuple(e for e in spec.retry_on if isinstance(e, type))
    return StageCall(spec.name, spec.fn, spec.after, spec.timeout, spec.retries, types,
                     "error" in spec.retry_on, spec.backoff, spec.setup, spec.teardown)


def _group_policy(group: Sequence[StageSpec], engine: BatchPolicy) -> BatchPolicy:
    """Retries of the whole task: for the kinds the runner cannot retry itself (a crash, a
    hard timeout), as the group's stages ask."""
    kinds = tuple(sorted({e for s in group for e in s.retry_on
                          if isinstance(e, str) and e != "error"}))
    retries = max((s.retries for s in group if kinds), default=0) if kinds else 0
    return dataclasses.replace(engine, retries=retries, retry_on=kinds,
                               backoff=max(s.backoff for s in group))


def _cap(spec: StageSpec) -> int | None:
    """A stage's own limit on segments in the workers at once (``mem_per_task``: as many as
    the memory allows, planned as the engine plans its workers)."""
    caps = [c for c in (spec.max_concurrent,) if c is not None]
    if spec.mem_per_task is not None:
        caps.append(plan_workers(mem_per_task=spec.mem_per_task).workers)
    return min(caps) if caps else None


def _traffic(specs: Sequence[StageSpec], groups: Sequence[Group],
             leaves: Sequence[str]) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """Per group: the values its task reads from outside it (``reads``), and the values the
    parent must still hold once it is done (``keep``: what later groups read, and the leaves)."""
    reads = []
    for group in groups:
        inside = {specs[s].name for s in group.stages}
        reads.append(frozenset(d for s in group.stages for d in (specs[s].after or (INPUT,))
                               if d not in inside))
    keep = [frozenset(set().union(*reads[i + 1:]) | set(leaves)) for i in range(len(groups))]
    return reads, keep
