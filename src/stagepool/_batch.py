"""The batch driver: turns items into chunks, keeps a bounded number in flight, and gives every
item exactly one final piece (a run of results or one failure), whatever the backend reports.

    items (list, iterator) --islice--> chunk (start index, items)             Batch._take
        | ChunkSizer picks the size ("auto": learns per-item time, shrinks at the tail)
        | encoded HERE by the backend's codec, through LotEncoder (_encoding.py: a chunk that
        | will not encode is sent item by item, so exactly the items that cannot go fail)
        v
    backend.submit_many(Tasks)   at most max_in_flight tasks of this batch at once
        | the backend runs them: answer / LaneDied / Cancelled
        v
    Task.on_done --> this batch's queue --> Batch._wait_answer --> Answers.absorb (_answers.py)
        v
    pieces(): Run / Fail pieces, consumed by _streams (report, ordered or unordered outcomes)

Nothing is dropped or duplicated: each taken index is tracked until it has a final piece.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from ._answers import Answers, BatchPolicy, Lot, Piece
from ._backends import Backend, Group, OverBudget, Task, TaskResult
from ._config import Timeout
from ._costs import CostHints, arrange, make_sizer
from ._encoding import LotEncoder
from ._errors import EngineClosed
from ._mailslot import Mailslot
from ._outcome import BatchStats
from ._pressure import PressureGate
from ._progress import Progress, ProgressSink, make_sink
from ._reading import NOTHING, read_within
from ._status import register
from ._window import OrderWindow

__all__ = ["Batch", "BatchSpec"]

# Inputs read by slicing (ItemSource): exactly these types, not subclasses that may slice oddly.
SLICED = (list, tuple, range)
# How long the batch loop sleeps at most when waiting, so Ctrl-C and retry back-off are noticed.
WAIT_SLICE = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSpec:
    """One call's validated request (made by the engine at call time; nothing started yet)."""

    fn: Callable[[Any], Any]
    items: Iterable[Any]
    total: int | None  # None for an iterator of unknown length
    chunk_size: int | None  # None: automatic
    timeout: Timeout
    policy: BatchPolicy
    progress: bool = False
    desc: str | None = None
    on_progress: Callable[[Progress], object] | None = None
    max_in_flight: int | None = None  # chunks submitted and not yet consumed
    max_concurrent: int | None = None  # items of this batch in workers at once
    hints: CostHints | None = None  # cost=, size=, unit=, lookahead= (_costs.py)


def _sliced(items: Iterable[Any]) -> Sequence[Any] | None:
    return cast(Sequence[Any], items) if type(items) in SLICED else None


class ItemSource:
    """A batch's input, read a chunk at a time: the items, or their longest-first arrangement.

    A source fed by another thread (a pipeline's next stage) says with ``available()`` how many
    items it can give without blocking (its end counts as one) and calls the batch's ``wake``
    when it gets more, so the batch keeps draining answers meanwhile.
    """

    def __init__(self, it: Iterator[Any], seq: Sequence[Any] | None = None) -> None:
        """``seq``: the list, tuple or range ``it`` iterates, read by slicing instead (a tenth
        of the time)."""
        self.it = it
        self._seq, self._at = seq, 0
        self._available: Callable[[], int] | None = getattr(it, "available", None)
        self._back: list[Any] = []  # items read and given back (unread): read first
        self._it_ended = False  # the iterator ran out (or raised)
        self.exhausted = False
        self.error: BaseException | None = None  # the caller's iterable raised this

    def skip_rest(self) -> int:
        """Read the rest without keeping it; how many items that was."""
        back, self._back = len(self._back), []
        if self._seq is not None:
            rest, self._at = max(0, len(self._seq) - self._at), len(self._seq)
            return back + rest
        return back + sum(1 for _ in self.it)

    def available(self) -> int:
        if self._available is None:
            return 1 << 30
        return len(self._back) + int(self._available())

    def unread(self, items: list[Any]) -> None:
        """Give back ``items``, the last ones read: the next reads return them first."""
        self._back[:0] = items
        self.exhausted = False

    def read(self, size: int, max_bytes: int | None = None) -> list[Any]:
        """Up to ``size`` items; fewer at the end (or when the iterable raised: those it gave
        before are kept, since ``list.extend`` keeps them, and the rest of the batch finishes).
        ``max_bytes``: from an iterator, stop before the item whose arrays would pass it (see
        ``_reading``); it is read first next time, in a chunk of given-back items only."""
        if self._back:
            chunk = self._back[:size]
            del self._back[:size]
            if len(chunk) < size and not self._ended() and max_bytes is None:
                chunk += self._read(size - len(chunk), max_bytes)
            self.exhausted = not self._back and self._ended()
            return chunk
        return self._read(size, max_bytes)

    def _ended(self) -> bool:
        """Whether the underlying items are all read (the given-back ones aside)."""
        if self._seq is not None:
            return self._at >= len(self._seq)
        return self._it_ended

    def _read(self, size: int, max_bytes: int | None) -> list[Any]:
        if self._seq is not None:  # already in memory: the encoder's budget bounds the chunk
            part = self._seq[self._at : self._at + size]
            self._at += len(part)
            self.exhausted = self._at >= len(self._seq)
            return part if type(part) is list else list(part)
        chunk: list[Any] = []
        over = NOTHING
        try:
            if max_bytes is None:
                chunk.extend(itertools.islice(self.it, size))
            else:
                over = read_within(self.it, size, max_bytes, chunk)
        except Exception as exc:  # not KeyboardInterrupt: the caller's Ctrl-C stops the batch
            self.error = exc
        if over is not NOTHING:
            (self._back if chunk else chunk).append(over)
        elif len(chunk) < size:
            self.exhausted = self._it_ended = True
        return chunk


class Batch:
    """One call's worth of work: feeds chunks with backpressure and yields final pieces.

    Built when the work starts (the first ``next`` of an ``imap``), not when it is requested.
    """

    def __init__(self, backend: Backend, spec: BatchSpec) -> None:
        self.backend, self.spec, self.codec = backend, spec, backend.codec
        self.total = spec.total
        # With cost hints the batch works in dispatch positions (_costs.py), not input indices.
        self.arrangement = arrange(spec.hints, spec.items, self.total, backend.workers)
        items = spec.items
        self.source = ItemSource(iter(items) if self.arrangement is None else self.arrangement,
                                 _sliced(items) if self.arrangement is None else None)
        self.group = Group()
        self.arena = id(self.group)
        self.answers: Mailslot[tuple[Task | None, TaskResult]] = Mailslot()
        # Orders _on_done against cancel(). Re-entrant: cancel() also runs from the finalizer of
        # an abandoned generator, which the garbage collector may start inside _on_done.
        self.lock = threading.RLock()
        self.outbox: list[Task] = []  # encoded chunks _fill hands to the backend in one go
        self.sizer = make_sizer(spec.chunk_size, backend.workers, self.total,
                                backend.capabilities.chunk_seconds, self.arrangement,
                                chunk_bytes=backend.capabilities.chunk_bytes)
        self.max_in_flight = spec.max_in_flight or spec.policy.max_in_flight
        self.max_chunk = spec.policy.max_chunk or sys.maxsize  # max_tasks_per_worker
        self.sink: ProgressSink | None = make_sink(
            progress=spec.progress, on_progress=spec.on_progress, total=self.total,
            desc=spec.desc, meter=self.arrangement)
        self.items_out = 0
        self.next_index = 0
        self.in_flight: dict[int, Lot] = {}  # task id -> what it carries
        self.out = Answers(self.codec, self.sizer, spec.policy, spec.timeout)
        if self.arrangement is not None:
            self.out.label = self.arrangement.label
        elif hasattr(spec.items, "label"):  # a pipeline's inbox: positions are not its segments
            self.out.label = spec.items.label
        self.encoder = LotEncoder(
            self.codec, spec.fn, spec.timeout, self.arena, self.out.final, self.out.label,
            None if self.arrangement is None else self.arrangement.refusal)
        # Ordered streaming (see _window): ``emitted`` is set by the consumer.
        self.ordered = False
        self.collecting = False  # set by run_to_report: only the whole report is wanted
        self.emitted = 0
        self.window = OrderWindow()
        self.started = time.perf_counter()
        memory = spec.policy.memory
        self.gate = None if memory is None else PressureGate(memory)
        self.label, self.desc = self.out.label, spec.desc
        self.number = register(self)  # for Engine.status() (_status.py)
        self.codec.open_arena(self.arena)

    @property
    def source_error(self) -> BaseException | None:
        """The exception the caller's items iterable raised, if it did (the items taken before
        it still finish; the stream re-raises it after them)."""
        return self.source.error

    # ---- feeding -----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Take and encode chunks up to the window, then hand them to the backend together."""
        try:
            self._fill_outbox()
        finally:
            self._flush()

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, []
        if not outbox:
            return
        try:
            self.backend.submit_many(outbox)
        except EngineClosed as exc:
            for task in outbox:
                self.codec.release(task.items, None)
                lot = self.in_flight.pop(task.id)
                self.items_out -= len(lot.items)
                self._cancel_rest(lot, exc)

    def _fill_outbox(self) -> None:
        again = self.out.again
        while len(self.in_flight) < self._window_size():
            if self.gate is not None and not self.gate.allows(idle=not self.in_flight):
                return  # memory is nearly full: running items finish, nothing new starts
            if again and again[0].due <= time.monotonic():
                lot = self.out.next_again(self._room())
                if lot is None:
                    return
                self._submit(lot)
            elif not self.source.exhausted and self._window_open() and self._room() > 0 \
                    and self.source.available() > 0:
                self._take()
            else:
                return

    def _window_size(self) -> int:
        """Chunks in flight at most (``ChunkSizer.in_flight_limit``); a caller's own
        ``max_in_flight`` is kept."""
        if self.spec.max_in_flight is not None:
            return self.max_in_flight
        return self.sizer.in_flight_limit(self.max_in_flight, len(self.in_flight), self.next_index)

    def _room(self) -> int:
        """How many more items ``max_concurrent`` lets into the workers now."""
        if self.spec.max_concurrent is None:
            return 1 << 30
        return self.spec.max_concurrent - self.items_out

    def _window_open(self) -> bool:
        if not self.ordered or (self.arrangement is not None and
                                self.arrangement.inside_block(self.next_index)):
            return True  # a reordered block is taken whole, or its first index might never come
        return self.window.open(self.emitted, self.next_index, self.max_in_flight)

    def _take(self) -> None:
        size = min(self.sizer.next_size(self.next_index), self._room(), self.source.available(),
                   self.max_chunk)
        chunk = self._take_back_first(size)
        chunk += self.source.read(size, self.sizer.read_bytes(size))
        if not chunk:
            return
        start, self.next_index = self.next_index, self.next_index + len(chunk)
        try:
            self._submit(Lot(start, chunk, 1, 0), self.sizer.payload_budget(len(chunk)))
        except OverBudget:  # the payload per item was misjudged: learn it again, item by item
            self.next_index = start
            self.source.unread(chunk)
            self.sizer.observe_overrun(len(chunk))
            return
        if self.ordered:
            self.window.took(start)

    def _take_back_first(self, size: int) -> list[Any]:
        """The batch's first item, which went to the outbox alone to learn the payload per
        item, taken back to go with the first chunk of the blind plan just made (``size`` items
        from position 1), when the sizer says it should (``first_joins_plan``); [] if it stays.

        Alone, it cost a round trip, and its worker's planned chunk waited behind it (a worker
        holds two tasks at most): 20,000 x (x * 2) paired with multiprocessing.Pool.map, 0.82x
        alone, 0.89x joined."""
        if self.next_index != 1 or len(self.outbox) != 1 or self.arrangement is not None \
                or not self.sizer.blind:  # no blind plan to join (only a pool's payload is bytes)
            return []
        task = self.outbox[0]
        if (task.first != 0 or task.n_items != 1 or size >= min(self.max_chunk, self._room())
                or not self.sizer.first_joins_plan(len(task.items))):
            return []
        self.outbox.clear()
        self.codec.release(task.items, None)
        self.items_out -= 1
        self.next_index = 0
        return list(self.in_flight.pop(task.id).items)

    def _submit(self, lot: Lot, budget: int | None = None) -> None:
        """Encode the lot (or what of it can go: see ``_encoding``) into tasks for the outbox.
        ``budget``: ``OverBudget`` propagates, nothing sent, when the whole lot's payload would
        pass it."""
        encoder = self.encoder
        for part, encoded, timeouts in encoder.ready(lot, budget):
            items = part.items
            self.sizer.observe_payload(len(items), encoded.nbytes)
            task = Task(self.group, encoder.fn_key, encoder.fn_form, encoded.payload, len(items),
                        self._on_done, timeouts,
                        self.sizer.expected_seconds(len(items), part.start),
                        self.sizer.per_item_clock(),
                        # worker logs name items by first + offset, or (arranged) by indices
                        first=part.start, indices=self._indices(part.start, len(items)),
                        planned=self.sizer.planned_chunks(part.start) > 0,
                        budget=self.sizer.budget(len(items), part.start) if len(items) > 1 else None)
            self.outbox.append(task)
            self.in_flight[task.id] = part._replace(items=self.codec.keep(encoded, items))
            self.items_out += len(items)

    def _indices(self, start: int, n: int) -> tuple[int, ...] | None:
        """The input indices of dispatch positions ``start``.. when they are not the same."""
        return None if self.arrangement is None else tuple(map(self.arrangement.label,
                                                               range(start, start + n)))

    def _cancel_rest(self, lot: Lot, closed: EngineClosed) -> None:
        """The engine shut down under this batch: what never ran is cancelled, not lost.

        For a sized input the items not yet taken get their cancelled outcome too; an iterator
        of unknown length simply stops being read."""
        runs = [(lot.start, len(lot.items))]
        if self.total is not None and not self.source.exhausted:
            rest = self.source.skip_rest()
            runs.append((self.next_index, rest))
            self.next_index += rest
        self.source.exhausted = True
        for first, n in runs:  # the closing's own cause says why, if the engine failed
            self.out.cancelled(first, n, closed, closed, lot.runs)

    def _on_done(self, task: Task, result: TaskResult) -> None:
        # Runs in a backend thread: hand over, nothing more. A batch that was abandoned will
        # never read its answers, so their memory is freed here instead.
        with self.lock:
            if not self.group.cancelled:
                self.answers.put((task, result))
                return
        self._free(task, result)

    def _free(self, task: Task, result: TaskResult) -> None:
        """An answer nobody will read: its inputs' and results' memory goes now."""
        self.codec.release(task.items, None)
        self.codec.drop(result)

    # ---- the loop --------------------------------------------------------------------------------

    def pieces(self) -> Iterator[Piece]:
        """Yield final pieces until every taken item has one; cancel leftovers on exit."""
        finished = False
        # A report of known length may plan its rest before the cost of an item is known: the
        # backend cuts a chunk that runs long (see _chunking).
        # Not under rerun_innocent=False: a crash loses the results of its whole chunk, and a
        # blind chunk is half the batch on two workers (20 of 60 items lost, against a few in
        # chunks sized from what was learnt).
        self.sizer.blind = (self.collecting and self.backend.capabilities.cuts_chunks
                            and self.spec.policy.rerun_innocent)
        try:
            while not self.group.cancelled:  # abandon() from another thread ends the loop
                self._fill()
                if self.out.ready:
                    yield from self._drain_ready()
                    continue
                if not self.in_flight:
                    if self.source.exhausted and not self.out.again:
                        finished = True
                        return
                    self._wait_answer()  # a sleep that wake() cuts short
                    continue
                self._wait_answer()
        finally:
            if not finished:
                self.cancel(kill_running=False)
            self.codec.close_arena(self.arena)
            if self.sink is not None:
                self.sink.close()

    def _until_resend(self) -> float:
        again = self.out.again
        left = again[0].due - time.monotonic() if again else WAIT_SLICE
        # Due already, yet _fill did not send it: the window, max_concurrent or the memory gate
        # holds it back, and only an answer (which ends the wait) can free a place. Waiting 0
        # here spun a CPU away from the workers.
        return WAIT_SLICE if left <= 0 else min(WAIT_SLICE, left)

    def _drain_ready(self) -> Iterator[Piece]:
        ready, self.out.ready = self.out.ready, []
        yield from ready if self.arrangement is None else self.arrangement.translate(ready)
        if self.sink is not None:
            self.sink.update(self.out.done, self.out.failed)

    def _wait_answer(self) -> None:
        # Every answer already there is absorbed before refilling.
        for task, result in self.answers.take(self._until_resend()):
            if task is not None:  # None: the wake-up of abandon()
                self._absorb(task, result)

    def _absorb(self, task: Task, result: TaskResult) -> None:
        lot = self.in_flight.pop(task.id, None)
        if lot is None:
            self.codec.release(task.items, None)
            return
        self.items_out -= len(lot.items)
        again = len(self.out.again)
        try:
            self.out.absorb(lot, result)
        finally:
            # The inputs' memory: reused by the next chunks, unless some of these items go out
            # again (a crash's innocents, a retry, a split), whose views must keep their data.
            self.codec.release(task.items, self.arena if len(self.out.again) == again else None)

    # ---- stopping --------------------------------------------------------------------------------

    def _withdraw(self, kill_running: bool) -> None:
        with self.lock:  # from here on _on_done frees answers instead of queueing them
            self.group.cancelled = True
        self.backend.withdraw(self.group, kill_running=kill_running)

    def wake(self) -> None:
        """From any thread: the source has more items; look again now."""
        self.answers.put((None, None))

    def abandon(self, *, kill_running: bool) -> None:
        """From any thread, never blocks: the batch stops taking items and sending chunks,
        queued chunks are withdrawn, running ones are killed (``kill_running``) or finish
        unobserved, and the thread running :meth:`pieces` leaves it at once."""
        self._withdraw(kill_running)
        self.wake()  # the batch thread may wait for an answer

    def cancel(self, *, kill_running: bool) -> None:
        """In the batch's own thread: withdraw as :meth:`abandon` does, stop taking items, and
        free the answers already queued (they will never be read)."""
        self.source.exhausted = True
        self.out.again.clear()
        self._withdraw(kill_running)
        for task, result in self.answers.take(0.0):  # answers that will never be read
            if task is not None:
                self._free(task, result)

    def stats(self) -> BatchStats:
        gate = self.gate
        return self.out.stats(self.next_index, time.perf_counter() - self.started,
                              self.backend.workers, pauses=gate.pauses if gate else 0,
                              paused_time=gate.paused_time() if gate else 0.0)

