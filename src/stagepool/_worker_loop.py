"""The item loop of a worker: a chunk's items run one by one, each one's value or exception kept,
and the worker's slot of the shared record saying which item it is on.

    run_chunk(fn, items) --> ChunkResult(values, stamps, errors, pid)
       each item: its offset into the record first (exact blame when the worker dies), then fn(item)

The record is an mmap of a memfd owned by the parent (``_backends._local._record`` reads it);
the loop also runs outside a pool (dask, the serial backend, tests) with a ``Scratch`` record.
Split from ``_worker`` (the process around this loop: its pipes, function cache and guards).
Imports nothing heavy, like it.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _worker_budget
from ._compiled import tinyloop
from ._worker_errors import ErrInfo, exc_info, explain_read_only
from ._worker_guards import explain_memory_error, forked_children, guard_items, leave_fork
from ._worker_stderr import let_parent_read

# The tiny-item loop in C where the install could build it (see _compiled), else None.
_c_loop: Callable[[Callable[[Any], Any], list[Any], list[Any], Any, int], None] | None = (
    None if tinyloop is None else tinyloop.run)

__all__ = [
    "F_CHUNK", "F_OFFSET", "F_PHASE", "F_PID", "F_START", "OFFSET_ENCODING", "OFFSET_FREEING",
    "PHASE_DECODE", "PHASE_ENCODE", "PHASE_IDLE", "PHASE_INIT", "PHASE_RUN", "RECORD_FIELDS",
    "SLOT_STRIDE", "ChunkResult", "Record", "Scratch", "decoded_result", "run_chunk",
]

# Slot layout in the shared record, in 8-byte fields: pid, chunk id, item offset, item start time
# (time.monotonic, shared by all processes on Linux), phase. Phases tell the parent what a dead
# worker was doing: a death while decoding or encoding is not any single item's fault.
RECORD_FIELDS = 5
F_PID, F_CHUNK, F_OFFSET, F_START, F_PHASE = range(RECORD_FIELDS)
# Slots start SLOT_STRIDE fields (128 bytes) apart: two cache lines each, since x86 fetches lines
# in pairs. Packed 40 bytes apart, two workers' slots shared a line, and each worker's per-item
# offset store took that line from the other core: ~150 ns a store in a real two-worker pool
# (a third of the tiny-item loop's time), against ~35 ns on a line of its own.
SLOT_STRIDE = 16
PHASE_IDLE, PHASE_DECODE, PHASE_RUN, PHASE_ENCODE, PHASE_INIT = 0, 1, 2, 3, 4
# Offsets of a worker past its chunk's items, since F_START: letting go of the chunk it
# answered (PHASE_IDLE), or of its shared-memory inputs and pickling its answer (PHASE_ENCODE).
# A finalizer or a __reduce__ that hangs there is stopped at the chunk's (or, after the
# answer, the next chunk's) shortest limit (_backends._local._limits).
OFFSET_FREEING, OFFSET_ENCODING = -2, -3


class ChunkResult(NamedTuple):
    """A chunk's answer: one value per item (None where it failed) and how the items went.

    On the wire it is a plain tuple with the stamps as bytes (``encode_result``,
    ``decoded_result``): pickling the named tuple and the array looked their classes up by name
    on every answer, 12 us of a worker's ~18 us to encode a one-item answer."""

    values: list[Any]
    stamps: array[float]  # n + 1 timestamps (each item's start, then the end), or start and end
    errors: dict[int, ErrInfo] | None  # by offset in the chunk
    pid: int


def decoded_result(wire: Any) -> ChunkResult:
    """The ``ChunkResult`` of an unpickled answer (``encode_result``'s plain tuple)."""
    values, stamps, errors, pid = wire
    clock = array("d")
    clock.frombytes(stamps)
    return ChunkResult(values, clock, errors, pid)


class Record:
    """This worker's slot in the parent's shared record."""

    def __init__(self, path: str, slot: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        base = slot * SLOT_STRIDE
        self.ints = memoryview(self._mm).cast("q")[base : base + RECORD_FIELDS]
        self.floats = memoryview(self._mm).cast("d")[base : base + RECORD_FIELDS]
        self.ints[F_PID] = os.getpid()


class Scratch:
    """Where run_chunk writes its progress when it runs outside a pool worker (tests, dask, the
    serial backend, whose status() reads it)."""

    def __init__(self) -> None:
        self.ints = memoryview(bytearray(8 * RECORD_FIELDS)).cast("q")
        self.floats = memoryview(bytearray(8 * RECORD_FIELDS)).cast("d")


_NO_RECORD: Any = Scratch()


def run_chunk(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    record: Record | Scratch | None = None,
    chunk_id: int = 0,
    timed: bool = False,
    per_item_clock: bool = True,
    passthrough: tuple[type[BaseException], ...] = (),
    readonly_inputs: bool = False,
    budget: float = 0.0,
) -> ChunkResult:
    """Run ``fn`` on each item; capture each value or exception, and when each item started.

    Never raises for an item's failure, including ``SystemExit`` and ``KeyboardInterrupt`` raised by
    the function: those are that item's error, not the worker's death.

    ``per_item_clock=False`` is the loop for tiny items (under ~10 us each; two clock reads cost
    ~0.1 us, as much as a trivial item): the timestamps are then only the chunk's start and end,
    and each item's duration is the chunk's mean. ``timed`` (a per-item timeout is running) adds
    each item's start time to the record, for the parent's deadline; tiny items skip that too,
    even when timed: the parent then watches their offsets instead
    (``_backends._local._limits.sampled_deadline``).
    ``budget`` (seconds, 0.0: none): the chunk stops between items once it has run that long,
    and the answer holds fewer values than ``items``: the rest never started (the parent sends
    it again). Checked after each item with ``per_item_clock``; else a timer thread ends the
    loop after the running item (``_worker_budget``), so a slow first item comes back alone,
    items that turn slow inside the chunk stop it within an item (and the switch interval),
    and tiny items pay no clock read at all. A list ``items`` is emptied then (the worker's
    decoded chunk is its own); another sequence is run with a clock read per item.
    Exceptions of the ``passthrough`` types propagate (in-process runs: the caller's Ctrl-C).
    ``readonly_inputs``: the items' arrays are read-only, so a "read-only" ValueError gets a
    note saying how to get writable inputs.

    In a pool worker, a child process that ``fn`` forked and that comes back here (returning or
    raising, ``sys.exit`` included) exits at once: only the worker itself may answer.
    """
    values: list[Any] = []
    errors: dict[int, ErrInfo] | None = None
    clock = time.perf_counter
    if record is None:
        record = _NO_RECORD
    ints = record.ints
    ints[F_CHUNK] = chunk_id
    ints[F_PHASE] = PHASE_RUN
    forked = forked_children  # non-empty only in a child that the item forked: it must not go on
    stamps = array("d") if per_item_clock else array("d", [clock()])
    # One try around the loop, not one per item: after a failure it resumes with the next item.
    # No "did the item fork?" test per item: a forked child's at-fork hook empties ``items``
    # (_worker_guards.mark_forked), so its loop ends and it leaves below.
    guard_items(items)
    it = _numbered(items)
    # The tiny loop in C takes the list itself (a clock read per item runs in Python anyway).
    tiny = items if _c_loop is not None and type(items) is list else None
    # The budget runs from the chunk's start, across the items that raise.
    stop = clock() + budget if budget > 0 else None
    try:
        while True:
            try:
                if stop is None:
                    _loop(fn, it, record, stamps if per_item_clock else None, values,
                          tiny=tiny)
                elif per_item_clock:
                    _loop(fn, it, record, stamps, values, stop)
                else:
                    _budgeted(fn, items, it, record, values, stop, tiny)
                break
            except BaseException as exc:
                if forked:
                    leave_fork(exc)
                if isinstance(exc, passthrough):
                    raise
                errors = _add_error(errors, len(values), exc, readonly_inputs)  # its offset
                values.append(None)
                del exc
                # What it wrote to stderr is logged with it, not with the next item.
                let_parent_read(clock() - stamps[-1] if per_item_clock and stamps else 0.0)
    finally:
        guard_items(None)
    if forked:
        leave_fork(None)
    stamps.append(clock())
    return ChunkResult(values, stamps, errors, os.getpid())


# Offsets 0, 1, 2 ... made once, for the chunks to come: enumerate makes an int per item past
# 256, ~10 ns of the ~100 ns the tiny-item loop spends on an item. Built up to the largest chunk
# seen (a chunk holds at most 65,536 items unless the caller fixes a bigger chunk_size: then
# enumerate); ~36 bytes an offset, against at least 8 for each item of the chunk itself.
_offsets: list[int] = []
MAX_OFFSETS = 1 << 16


def _numbered(items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    """``enumerate(items)``, with offsets made once per process."""
    global _offsets
    n = len(items)
    if n > MAX_OFFSETS:
        return enumerate(items)
    offsets = _offsets
    if len(offsets) < n:  # a new list, not extended in place: another thread may be zipping it
        offsets = _offsets = list(range(n))
    return zip(offsets, items, strict=False)  # the offsets outnumber the items


def _loop(fn: Callable[[Any], Any], it: Iterator[tuple[int, Any]], record: Record | Scratch,
          stamps: array[float] | None, values: list[Any], stop: float = math.inf, *,
          tiny: list[Any] | None = None) -> None:
    """Run ``fn`` on the rest of ``it``, each item's offset in the record first (exact blame
    when the worker dies); ``stamps``: each item's start time too (None: tiny items), and
    then it returns after an item that ended past ``stop`` (a budget: the rest never starts).
    ``tiny``: the list ``it`` iterates, for the tiny loop in C, which goes on from item
    ``len(values)`` (``it`` is then left alone: use one or the other for a whole chunk)."""
    ints, floats = record.ints, record.floats
    if stamps is None:  # tiny items: a crashed one ran since about then; status() counts from here
        floats[F_START] = time.monotonic()
        if tiny is not None and _c_loop is not None:
            # The same loop as below: ~60 ns an item against ~100, the store into the shared
            # record a plain memory write instead of a memoryview's item assignment (~35 ns).
            _c_loop(fn, tiny, values, ints, F_OFFSET)
            return
        for offset, item in it:
            ints[F_OFFSET] = offset
            values.append(fn(item))  # a method call 3.11 specialises: ~4 ns less than a bound one
        return
    stamp, now, clock = stamps.append, time.monotonic, time.perf_counter
    for offset, item in it:
        # The start time first: the parent reads the offset first, then the time. Always
        # written (~50 ns): it is also how long a crashed or timed-out item ran, and what
        # status() counts from.
        floats[F_START] = now()
        ints[F_OFFSET] = offset
        stamp(clock())
        values.append(fn(item))
        if stop < math.inf and clock() >= stop:  # one more clock read only with a budget
            return


def _budgeted(fn: Callable[[Any], Any], items: Sequence[Any], it: Iterator[tuple[int, Any]],
              record: Record | Scratch, values: list[Any], stop: float,
              tiny: list[Any] | None = None) -> None:
    """The tiny-item loop of ``_loop`` on the rest of ``it`` (which iterates ``items``), ended
    after the running item once ``time.perf_counter()`` passed ``stop``: the budget thread
    empties ``items`` then (``_worker_budget``), so the loop reads no clock. Re-entered after
    an item's error, it stays armed; a sequence that is not a list gets a clock read per item.
    Each item's offset still goes to the record first (``_loop``): blame stays exact.

    It replaced clock reads between blocks of 1, 1, 2, 4 ... 1,024 items, as cheap per item,
    under which items that turned slow inside a block all ran before the next read: 3,000 tiny
    items then 300 of 10 ms ran the slow ones on one worker, 3.06 s against 1.5 s."""
    if type(items) is not list:
        _loop(fn, it, record, array("d"), values, stop)
        return
    _worker_budget.arm(items, stop)
    _loop(fn, it, record, None, values, tiny=tiny)
    _worker_budget.disarm()


def _add_error(errors: dict[int, ErrInfo] | None, offset: int, exc: BaseException,
               readonly_inputs: bool = False) -> dict[int, ErrInfo]:
    errors = {} if errors is None else errors
    if readonly_inputs:
        explain_read_only(exc)
    explain_memory_error(exc)
    errors[offset] = exc_info("error", exc)
    return errors
