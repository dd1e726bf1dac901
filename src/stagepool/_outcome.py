"""Per-item outcomes and the batch report.

A batch of 20,000 trivial items must not cost 20,000 Python objects in the parent, so the report is
*columnar*: values, durations and worker pids live in flat lists/arrays filled a whole chunk at a
time, failures in a dict keyed by item index. :class:`Outcome` objects are built only when the
caller looks at one (``report[i]``, iteration, ``report.failed``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, Generic, Literal, NamedTuple, TypeVar, overload

__all__ = ["BatchReport", "BatchStats", "Kind", "Outcome", "RemoteTraceback", "ok_outcomes"]

T = TypeVar("T")
Kind = Literal["ok", "error", "timeout", "crash", "serialization", "cancelled"]


class RemoteTraceback(Exception):
    """The worker's formatted traceback, attached as ``__cause__`` of an error raised in a worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """What the parent keeps of one failed item (private: the public view is :class:`Outcome`)."""

    kind: Kind
    error: Exception
    traceback: str | None = None
    duration: float = 0.0
    worker: int | None = None
    attempts: int = 1


class Outcome(NamedTuple, Generic[T]):
    """The single result of one input item: a value or an error, never both.

    ``kind`` is ``"ok"``, ``"error"`` (the function raised), ``"timeout"``, ``"crash"`` (the worker
    process died), ``"serialization"`` (something could not be pickled) or ``"cancelled"``.
    ``duration`` is seconds spent in the worker (for items under ~10 us, the mean of their chunk),
    ``worker`` its pid, ``attempts`` how many times the item was run (retries included).
    ``key`` is what the call's ``key=`` callable returned for the item (None without one), so a
    streamed outcome names its segment without a side table.

    An immutable named tuple: cheap to build by the million in a stream (a frozen dataclass costs
    five times more), comparable, and unpackable.
    """

    index: int  # type: ignore[assignment]  # the field hides tuple.index, on purpose
    ok: bool
    value: T | None
    error: Exception | None
    kind: Kind
    traceback: str | None
    duration: float
    worker: int | None
    attempts: int = 1
    key: Any = None

    def unwrap(self) -> T:
        """Return the value, or raise the item's error (with the worker traceback as ``__cause__``)."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


# Builds an Outcome from a 10-tuple without NamedTuple's argument parsing (the streaming hot path).
make_outcome: Any = functools.partial(tuple.__new__, Outcome)
_new_tuple: Any = tuple.__new__


def ok_outcomes(first: int, values: Sequence[Any], durations: Iterable[float],
                workers: Iterable[int | None], attempts: Iterable[int],
                keys: Iterable[Any]) -> list[Outcome[Any]]:
    """The outcomes of successful items ``first``, ``first + 1`` ..., one per value (the other
    columns as long as ``values``, or ``itertools.repeat``), built by C loops (zip, map): ~260 ns
    an outcome against ~500 for a ``make_outcome`` call each in a comprehension, the hot path
    of an ``imap`` and of iterating a report."""
    rows = zip(range(first, first + len(values)), repeat(True), values, repeat(None),
               repeat("ok"), repeat(None), durations, workers, attempts, keys)
    return list(map(_new_tuple, repeat(Outcome), rows))


@dataclasses.dataclass(frozen=True, slots=True)
class BatchStats:
    """Where the time went in one batch."""

    items: int
    wall_time: float
    busy_time: float
    workers: int
    chunks: int
    chunk_size: float
    retries: int = 0
    restored: int = 0  # items taken from a checkpoint instead of run (not counted in ``items``)
    pauses: int = 0  # times dispatch paused under memory pressure (Engine memory_high)
    paused_time: float = 0.0  # seconds it stayed paused

    @property
    def items_per_second(self) -> float:
        return self.items / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def parallel_efficiency(self) -> float:
        """Busy time in workers / (workers x wall time): 1.0 means every worker was always busy."""
        denom = self.workers * self.wall_time
        return min(1.0, self.busy_time / denom) if denom > 0 else 0.0


class _Run(NamedTuple):
    start: int
    n: int
    values: list[Any] | None  # None once the report's values are laid out
    durations: array[float]
    worker: int


class ReportBuilder:
    """Collects a batch's results chunk by chunk, in any order, then freezes into a report."""

    __slots__ = ("_attempts", "_failures", "_runs", "chunks", "retries")

    def __init__(self, size_hint: int = 0) -> None:
        # Runs are kept as they come and laid end to end once, in ``build``: for 20,000 items
        # that is one copy of each column, instead of a column of placeholders written over
        # chunk by chunk (~0.3 ms of a 4 ms map, in the thread the workers' answers wait for).
        self._runs: list[_Run] = []
        self._failures: dict[int, Failure] = {}
        self._attempts: dict[int, int] = {}
        self.chunks = 0
        self.retries = 0

    def place(
        self, start: int, values: list[Any], durations: array[float], worker: int, attempts: int = 1
    ) -> None:
        """Store a run of consecutive results (failed positions are overwritten by :meth:`fail`;
        a later run over the same positions, a retry's, overwrites an earlier one)."""
        self._runs.append(_Run(start, len(values), values, durations, worker))
        if attempts != 1:
            for i in range(start, start + len(values)):
                self._attempts[i] = attempts

    def fail(self, index: int, failure: Failure) -> None:
        self._failures[index] = failure

    def build(self, size: int, stats: BatchStats,
              keys: list[Any] | None = None) -> BatchReport[Any]:
        """The report. Its values are laid out now; durations and workers at the first look at
        an outcome (most callers read only ``values``: for 20,000 tiny items those two columns
        cost ~0.3 ms, a tenth of the parent's work)."""
        values: list[Any] = _lay(self._runs, size, _values_of, _nones)
        for index in self._failures:
            if index < size:
                values[index] = None
        timing = [run._replace(values=None) for run in self._runs]
        return BatchReport(values, timing, self._failures, self._attempts, stats, keys)


def _values_of(run: _Run) -> list[Any]:
    return run.values or []


def _durations_of(run: _Run) -> array[float]:
    return run.durations


def _workers_of(run: _Run) -> array[int]:
    return array("q", [run.worker]) * run.n


def _nones(n: int) -> list[Any]:
    return [None] * n


_ZERO_D, _ZERO_Q = array("d", [0.0]), array("q", [0])
_ITER_BLOCK = 1024  # outcomes a report's iterator builds at a time
_Column = TypeVar("_Column", list[Any], "array[float]", "array[int]")


def _lay(runs: list[_Run], size: int, part: Callable[[_Run], _Column],
         blank: Callable[[int], _Column]) -> _Column:
    """One column of the runs (in arrival order) laid end to end by position, gaps (failures)
    as ``blank`` placeholders; runs that overlap (a retried item inside an earlier run) are
    written over in arrival order."""
    ordered = sorted(runs, key=_start)
    if all(a.start + a.n <= b.start for a, b in itertools.pairwise(ordered)):
        column = blank(0)
        for run in ordered:  # a run of 20,000 is one copy, not placeholders written over
            column.extend(blank(run.start - len(column)))
            column.extend(part(run))
        column.extend(blank(size - len(column)))
    else:
        column = blank(max([size, *(run.start + run.n for run in runs)]))
        for run in runs:
            column[run.start : run.start + run.n] = part(run)
    del column[size:]
    return column


def _start(run: _Run) -> int:
    return run.start


class BatchReport(Sequence[Outcome[T]]):
    """Every item's :class:`Outcome`, in input order, plus statistics.

    Item failures never raise by themselves: look at ``failed``, or call :meth:`raise_on_failure`.
    """

    def __init__(
        self,
        values: list[Any],
        timing: list[_Run],
        failures: dict[int, Failure],
        attempts: dict[int, int],
        stats: BatchStats,
        keys: list[Any] | None = None,
    ) -> None:
        self._values = values
        self._keys = keys
        self._timing = timing  # laid out as the columns below at the first look (_columns)
        self._columns: tuple[array[float], array[int]] | None = None
        self._failures = failures
        self._attempts = attempts
        self.stats = stats

    def __len__(self) -> int:
        return len(self._values)

    def _outcome(self, i: int) -> Outcome[T]:
        failure = self._failures.get(i)
        key = None if self._keys is None else self._keys[i]
        if failure is not None:
            return make_outcome((i, False, None, failure.error, failure.kind,  # type: ignore[no-any-return]
                                 failure.traceback, failure.duration, failure.worker,
                                 failure.attempts, key))
        durations, workers = self._columns or self._lay_columns()
        return make_outcome((i, True, self._values[i], None, "ok", None,  # type: ignore[no-any-return]
                             durations[i], workers[i] or None,
                             self._attempts.get(i, 1), key))

    def _lay_columns(self) -> tuple[array[float], array[int]]:
        """Each item's duration and worker pid (a failure's from its ``Failure``). Two threads
        that get here together both lay them out, the same way."""
        n = len(self._values)
        durations = _lay(self._timing, n, _durations_of, _ZERO_D.__mul__)
        workers = _lay(self._timing, n, _workers_of, _ZERO_Q.__mul__)
        for index, failure in self._failures.items():
            if index < n:
                durations[index] = failure.duration
                workers[index] = failure.worker or 0
        self._columns = durations, workers
        self._timing = []
        return durations, workers

    @overload
    def __getitem__(self, i: int) -> Outcome[T]: ...
    @overload
    def __getitem__(self, i: slice) -> list[Outcome[T]]: ...
    def __getitem__(self, i: int | slice) -> Outcome[T] | list[Outcome[T]]:
        if isinstance(i, slice):
            return [self._outcome(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item index {i} out of range for a batch of {n}")
        return self._outcome(i % n if n else i)

    def __iter__(self) -> Iterator[Outcome[T]]:
        if self._failures or self._attempts:
            return (self._outcome(i) for i in range(len(self)))
        # Every item ok and run once: built a block at a time by C loops (ok_outcomes).
        blocks = map(self._ok_block, range(0, len(self), _ITER_BLOCK))
        return itertools.chain.from_iterable(blocks)

    def _ok_block(self, at: int) -> list[Outcome[T]]:
        durations, workers = self._columns or self._lay_columns()
        end = at + _ITER_BLOCK
        return ok_outcomes(at, self._values[at:end], durations[at:end],
                           [worker or None for worker in workers[at:end]], repeat(1),
                           repeat(None) if self._keys is None else self._keys[at:end])

    def __repr__(self) -> str:
        return f"<BatchReport {len(self)} items, {len(self._failures)} failed>"

    @property
    def successful(self) -> list[Outcome[T]]:
        """Outcomes of the items that succeeded, in input order."""
        failures = self._failures
        if not failures:
            return list(self)
        return [self._outcome(i) for i in range(len(self)) if i not in failures]

    @property
    def failed(self) -> list[Outcome[T]]:
        """Outcomes of the items that failed (any kind but ``"ok"``), in input order."""
        return [self._outcome(i) for i in sorted(self._failures)]

    @property
    def values(self) -> list[T]:
        """The values of the successful items, in input order."""
        if not self._failures:
            return list(self._values)
        failures = self._failures
        return [v for i, v in enumerate(self._values) if i not in failures]

    def values_or(self, fill: Any = None) -> list[T | Any]:
        """Every item's value in input order, ``fill`` in place of each failure: the list lines
        up with the inputs (``report.values`` leaves failures out)."""
        if not self._failures:
            return list(self._values)
        values = list(self._values)
        for i in self._failures:
            values[i] = fill
        return values

    @property
    def keys(self) -> list[Any]:
        """Each item's key (from the call's ``key=``) in input order; all None without one."""
        return [None] * len(self) if self._keys is None else list(self._keys)

    @property
    def success_rate(self) -> float:
        """Successful / total; 0.0 for an empty batch."""
        n = len(self)
        return (n - len(self._failures)) / n if n else 0.0

    @property
    def ok(self) -> bool:
        """True when every item succeeded (an empty batch is ok)."""
        return not self._failures

    def counts(self) -> dict[Kind, int]:
        """How many items ended in each kind (kinds with zero items are left out)."""
        counter: Counter[Kind] = Counter(f.kind for f in self._failures.values())
        ok = len(self) - len(self._failures)
        return {"ok": ok, **dict(counter)} if ok else dict(counter)

    def summary(self, *, max_failures: int = 5) -> str:
        """A short human report: counts, speed, and the first failures with index and cause."""
        s = self.stats
        n = len(self)
        head = (f"{n} items: {n - len(self._failures)} ok, {len(self._failures)} failed "
                f"({self.success_rate:.1%} success) in {s.wall_time:.2f} s "
                f"({s.items_per_second:,.0f} items/s, {s.workers} worker{'s' * (s.workers != 1)}, "
                f"parallel efficiency {s.parallel_efficiency:.0%}, {s.chunks} chunks)")
        if s.restored:
            head += f"; {s.restored} restored from the checkpoint, not run"
        lines = [head]
        if self._failures:
            kinds = ", ".join(f"{k} {c}" for k, c in self.counts().items() if k != "ok")
            lines.append(f"failures by kind: {kinds}")
            for i in sorted(self._failures)[:max_failures]:
                f = self._failures[i]
                lines.append(f"  item {i} [{f.kind}]: {type(f.error).__name__}: {f.error}")
            if len(self._failures) > max_failures:
                lines.append(f"  ... and {len(self._failures) - max_failures} more")
        return "\n".join(lines)

    def raise_on_failure(self) -> BatchReport[T]:
        """Raise an ``ExceptionGroup`` of every failure, each noted with its item index.

        Always an ``ExceptionGroup`` (caught by ``except Exception``): a worker's
        ``KeyboardInterrupt`` or ``SystemExit`` is already a :class:`RemoteError` in the outcome.

        Returns the report unchanged when nothing failed, so it chains:
        ``values = engine.map(f, xs).raise_on_failure().values``.
        """
        if not self._failures:
            return self
        errors = []
        for i in sorted(self._failures):
            err = self._failures[i].error
            note = f"stagepool: item {i} ({self._failures[i].kind})"
            if note not in getattr(err, "__notes__", ()):
                err.add_note(note)
            errors.append(err)
        raise ExceptionGroup(f"{len(errors)} of {len(self)} items failed", errors)


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (BatchReport, BatchStats, Outcome):
    _public.__module__ = "stagepool"
