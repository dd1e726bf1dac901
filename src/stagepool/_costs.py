"""Cost hints: longest-first dispatch, chunks cut by cost, and progress in the user's units.

Media items are not equal (a 30-second segment costs fifteen times a 2-second one). Given
``cost=`` (a callable of the item), a batch runs its items in dispatch *positions* that differ
from their input *indices*:

    items --read a block--> cost(item), size(item) per item     (a bad value: that item's
      |                                                          "error", it never runs)
      | block = the whole input (map of a known length: true longest-first, LPT)
      |       | ``lookahead`` items (streams, unknown lengths: bounded memory and reordering)
      v sorted longest-first inside the block (stable: equal costs keep input order)
    Batch sees positions 0, 1, 2, ...; CostSizer cuts chunks by cost, not count
      v
    Arrangement.translate: pieces back to input indices (messages already name them: label())

Results keep input order and outcome indices stay input indices. Without ``cost=`` nothing is
reordered (``size=`` alone only measures progress).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import numbers
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._answers import Fail, Piece, Run
from ._chunking import CHUNK_BYTES, MAX_CHUNK, MAX_STREAM_CHUNK, TAIL_SHARES, ChunkSizer
from ._config import check_positive_int
from ._progress import Reading

__all__ = ["Arrangement", "CostHints", "CostSizer", "arrange", "cost_hints", "make_sizer",
           "measure"]

# Items a stream reads ahead and reorders, per worker, when ``lookahead`` is not given. Enough
# for every worker to start on a long item while short ones wait; small enough that an ordered
# stream holds few results back and a slow source is not read far ahead.
LOOKAHEAD_PER_WORKER = 8
UNITS = ("s",)
# What an item of cost 0 weighs when chunks are cut: items that all say "free" are still shared
# out (a tail share of nothing would put them all in one chunk).
FREE = 1e-9


@dataclasses.dataclass(frozen=True, slots=True)
class CostHints:
    """One call's validated cost options (see :func:`cost_hints`)."""

    cost: Callable[[Any], Any] | None
    size: Callable[[Any], Any] | None  # the amount of each item in ``unit``, for progress
    unit: str | None
    lookahead: int | None  # items reordered together; None: the whole input when its length is known


def cost_hints(*, cost: object, size: object, unit: object, lookahead: object,
               stream: bool) -> CostHints | None:
    """Validate the cost options of one call (at the door, naming the argument); None if unused.

    ``stream``: the call yields outcomes as they finish (``imap``), so even a known-length input
    is reordered in ``lookahead`` blocks and the first outcomes do not wait for the whole batch.
    """
    for name, fn in (("cost", cost), ("size", size)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable of the item returning a number >= 0 "
                            f"(e.g. lambda seg: seg.seconds), or None; not {fn!r}")
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS} (seconds of media) or None, not {unit!r}")
    if unit is not None and cost is None and size is None:
        raise ValueError(f"unit={unit!r} needs cost= or size= (a callable giving each item's "
                         "amount in that unit)")
    look = check_positive_int(lookahead, "lookahead", allow_none=True)
    if look is not None and cost is None:  # silently ignored, it looked like it worked
        raise ValueError(f"lookahead={look} needs cost= (how many items are reordered by their "
                         "cost; without cost= nothing is reordered)")
    if cost is None and size is None:
        return None
    if unit is None and size is not None:
        unit = "s"
    if stream and look is None:
        look = -1  # "the default": LOOKAHEAD_PER_WORKER x workers, known once the batch starts
    return CostHints(cost, size, unit, look)  # type: ignore[arg-type]


def measure(fn: Callable[[Any], Any], item: Any, index: int, name: str) -> float | Exception:
    """``fn(item)`` as a finite number >= 0, or the error that fails this item (it never runs)."""
    try:
        value = fn(item)
    except Exception as exc:  # say whose error it is: the item's function never ran
        error: Exception = ValueError(f"{name}(item {index}) raised {type(exc).__name__}: {exc}; "
                                      "the item did not run")
        error.__cause__ = exc
        return error
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return TypeError(f"{name}(item {index}) must return a number >= 0, not {value!r}; "
                         "the item did not run")
    try:
        number = float(value)
    except OverflowError:  # an int (or Fraction) beyond float range: not finite either
        number = math.inf
    if not math.isfinite(number) or number < 0:
        return ValueError(f"{name}(item {index}) must return a finite number >= 0, got {value!r}; "
                          "the item did not run")
    return number


class Arrangement:
    """One batch's dispatch order: which input index each position holds, its cost and amount.

    Reads the items block by block (see the module docstring). Not thread-safe: used by the
    batch's own thread only.
    """

    def __init__(self, hints: CostHints, items: Iterable[Any], total: int | None,
                 workers: int) -> None:
        self.hints = hints
        look = hints.lookahead
        if hints.cost is None:
            look = 1  # nothing to reorder: read no further ahead than without hints (a lazy
            # sequence of big segments stays lazy); the total amount is then estimated
        elif look == -1 or (look is None and total is None):
            look = LOOKAHEAD_PER_WORKER * max(1, workers)
        self.block = max(1, look if look is not None else (total or 1))
        self.total = total
        self.index: list[int] = []  # position -> input index
        self.prefix = [0.0]  # prefix[p]: the cost of positions before p
        self.amounts: list[float] = []  # per position, in ``hints.unit`` (progress)
        self.bad: dict[int, Exception] = {}  # positions whose cost or size failed
        self.block_end = 0  # positions read so far
        self.amount_done = self.cost_done = 0.0
        self.items_done = 0
        self.amount_total: float | None = None  # known once a sized input is read to its end
        self._source = iter(items)
        self._pending: deque[Any] = deque()  # items read and arranged, not yet taken
        self._error: Exception | None = None  # the source's failure, raised after its items
        self._read_all = False

    def reading(self) -> Reading:
        """Progress so far, in the call's unit and in cost (the batch's progress meter)."""
        cost_total = self.prefix[-1] if self._read_all and self.hints.cost is not None else None
        amount_total = self.amount_total
        if amount_total is None and self.total and self.items_done:  # size= alone, not all read
            amount_total = self.amount_done / self.items_done * self.total  # the mean so far
        return Reading(self.hints.unit, self.amount_done, amount_total, self.cost_done,
                       cost_total)

    def label(self, position: int) -> int:
        """The input index of a position (what every message and outcome names)."""
        return self.index[position] if position < len(self.index) else position

    def refusal(self, start: int, n: int) -> Exception | None:
        """The error of the first of these positions whose cost or size failed (it never runs)."""
        if self.bad:
            for position in range(start, start + n):
                if position in self.bad:
                    return self.bad[position]
        return None

    def inside_block(self, position: int) -> bool:
        """Whether ``position`` is inside a reordered block already read (not at its start)."""
        return self.hints.cost is not None and 0 < position < self.block_end

    def cost(self, start: int, n: int) -> float:
        prefix = self.prefix
        return prefix[min(start + n, len(prefix) - 1)] - prefix[min(start, len(prefix) - 1)]

    def count_within(self, start: int, budget: float) -> int:
        """How many positions from ``start`` (in the block read) fit in ``budget``; at least 1."""
        prefix = self.prefix
        fit = bisect.bisect_right(prefix, prefix[start] + budget, lo=start + 1) - 1 - start
        return max(1, min(fit, self.block_end - start))

    def remaining(self, start: int) -> float | None:
        """The cost of the positions from ``start`` on, None while the input is not all read."""
        if not self._read_all:
            return None  # a stream: no tail to balance yet
        return self.prefix[-1] - self.prefix[start]

    # ---- reading -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next item in dispatch order; a failing source raises after the items it gave."""
        if not self._pending:
            self.fill(self.block_end)
        if self._pending:
            return self._pending.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration

    def fill(self, position: int) -> None:
        """Read and arrange the next block if ``position`` is past what was read."""
        if position < self.block_end or self._read_all:
            return
        block: list[Any] = []
        try:
            block.extend(itertools.islice(self._source, self.block))
        except Exception as exc:  # the caller's generator failed: run what it gave first
            self._error = exc
        self._pending.extend(self._arrange(len(self.index), block))
        if len(block) < self.block or self._error is not None or len(self.index) == self.total:
            self._read_all = True
            self.amount_total = sum(self.amounts)

    def _arrange(self, first: int, block: list[Any]) -> list[Any]:
        hints, rows = self.hints, []
        for i, item in enumerate(block, first):
            cost = measure(hints.cost, item, i, "cost") if hints.cost is not None else 0.0
            size = measure(hints.size, item, i, "size") if hints.size is not None else cost
            bad = next((x for x in (cost, size) if isinstance(x, Exception)), None)
            rows.append((0.0 if bad else cost, 0.0 if bad else size, bad, i, item))
        if hints.cost is not None:  # failures first (they cost nothing), then longest first
            rows.sort(key=lambda row: (row[2] is None, -row[0]))  # type: ignore[operator]
        for cost, size, bad, i, _ in rows:
            if bad is not None:
                self.bad[len(self.index)] = bad
            self.index.append(i)
            self.prefix.append(self.prefix[-1] + cost + FREE)  # type: ignore[operator]
            self.amounts.append(size)  # type: ignore[arg-type]
        self.block_end = len(self.index)
        return [row[4] for row in rows]

    # ---- answers -------------------------------------------------------------------------------

    def translate(self, pieces: list[Piece]) -> Iterator[Piece]:
        """Pieces in positions -> pieces in input indices (runs split where indices jump)."""
        for piece in pieces:
            if isinstance(piece, Fail):
                self.amount_done += self.amounts[piece.index]
                self.items_done += 1
                self.cost_done += self.cost(piece.index, 1)
                yield Fail(self.label(piece.index), piece.failure)
            else:
                yield from self._runs(piece)

    def _runs(self, run: Run) -> Iterator[Run]:
        start, values, durations, pid, attempts, skip = run
        offsets = [k for k in range(len(values)) if k not in skip]
        self.amount_done += sum(self.amounts[start + k] for k in offsets)
        self.items_done += len(offsets)
        self.cost_done += sum(self.cost(start + k, 1) for k in offsets)
        if self.hints.cost is None:  # nothing was reordered
            yield run
            return
        index = self.index
        for _, group in itertools.groupby(enumerate(offsets), lambda p: index[start + p[1]] - p[0]):
            ks = [k for _, k in group]
            yield Run(index[start + ks[0]], [values[k] for k in ks],
                      array("d", [durations[k] for k in ks]), pid, attempts, frozenset())


class CostSizer(ChunkSizer):
    """:class:`ChunkSizer` in cost units: it learns seconds per unit of cost and cuts each chunk
    to about ``target`` seconds, never more than a ``1 / (TAIL_SHARES x workers)`` share of the
    cost left (so a long item travels alone and the batch does not end on a straggler)."""

    def __init__(self, fixed: int | None, workers: int, arrangement: Arrangement,
                 target: float, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(fixed, workers, arrangement.total, target, chunk_bytes=chunk_bytes)
        self.arrangement = arrangement
        self._cost_seen = 0.0

    def observe(self, n_items: int, busy_seconds: float, start: int = -1) -> None:
        super().observe(n_items, busy_seconds)
        if start >= 0:
            self._cost_seen += self.arrangement.cost(start, n_items)

    def expected_seconds(self, size: int, start: int = -1) -> float | None:
        """By cost: a long item is not mistaken for an average one (a backend prefetches only
        chunks it expects to be short, behind a busy worker's)."""
        if start < 0 or self._cost_seen <= 0:
            return super().expected_seconds(size, start)
        return self._busy / self._cost_seen * self.arrangement.cost(start, size)

    def next_size(self, submitted: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self._encoded_items:
            return 1  # learn the payload per item first (as ChunkSizer does)
        arr = self.arrangement
        arr.fill(submitted)
        per_unit = self._busy / self._cost_seen if self._cost_seen > 0 else None
        budget = math.inf if per_unit is None else self.target / max(per_unit, 1e-12)
        left = arr.remaining(submitted)
        if left is not None:
            tail = left / (TAIL_SHARES * self.workers)
            if per_unit is not None:
                tail = max(tail, self.min_seconds / max(per_unit, 1e-12))
            budget = min(budget, tail)
        size = arr.count_within(submitted, budget) if submitted < arr.block_end else 1
        if left is None and per_unit is None:
            size = 1  # nothing known: one item at a time, as ChunkSizer does
        size = min(size, MAX_STREAM_CHUNK if left is None else MAX_CHUNK, self._overrun_cap)
        return max(1, min(size, self.chunk_bytes * self._encoded_items // max(1, self._payload)))


def arrange(hints: CostHints | None, items: Iterable[Any], total: int | None,
            workers: int) -> Arrangement | None:
    """The batch's arrangement, or None without hints (the batch then reads ``items`` as is)."""
    return None if hints is None else Arrangement(hints, items, total, workers)


def make_sizer(fixed: int | None, workers: int, total: int | None, target: float,
               arrangement: Arrangement | None, *, chunk_bytes: int = CHUNK_BYTES) -> ChunkSizer:
    """A sizer by cost when there are costs, else by count."""
    if arrangement is None or arrangement.hints.cost is None:
        return ChunkSizer(fixed, workers, total, target, chunk_bytes=chunk_bytes)
    return CostSizer(fixed, workers, arrangement, target, chunk_bytes=chunk_bytes)
