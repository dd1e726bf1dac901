"""The blind plan's costs (issue 15): the order in which a cut chunk's rest goes out, a block of
the budgeted tiny loop that turns slow, and a payload misjudged from the first items."""

from __future__ import annotations

import functools
import os
import time
import weakref
from array import array
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import _tasks
import stagepool as sp
from stagepool._answers import Answers, BatchPolicy, Lot
from stagepool._backends import OverBudget
from stagepool._backends._serial import InProcessCodec
from stagepool._batch import ItemSource
from stagepool._chunking import ChunkSizer
from stagepool._reading import NOTHING, read_within
from stagepool._worker import ChunkResult, run_chunk


def _nap(seconds: float) -> float:
    if seconds:
        time.sleep(seconds)
    return seconds


def _spin(seconds: float) -> float:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def _cut_answer(lot: Lot, ran: int, seconds: float) -> ChunkResult:
    """The answer of ``lot`` cut by its budget after ``ran`` items of ``seconds`` each."""
    stamps = array("d", [0.0, ran * seconds])
    return ChunkResult(list(lot.items[:ran]), stamps, None, os.getpid())


def test_the_rests_of_cut_chunks_go_out_in_input_order() -> None:
    """A blind plan's chunks of slow items are each cut after an item or two, in the order the
    workers reach them; their rests went out last cut first, so 200 uneven items ran the first
    chunk's rest last and ended 36 ms apart on two workers (14 in input order): 1-2% of the
    batch. The rests go out in input order, whatever order the cuts came in."""
    sizer = ChunkSizer(None, workers=2, total=200)
    sizer.blind = True
    answers = Answers(InProcessCodec(), sizer, BatchPolicy(), None)
    chunks = [Lot(start, list(range(start, start + 50)), 1, 0) for start in (0, 50, 100, 150)]
    for lot in (chunks[0], chunks[2], chunks[1], chunks[3]):  # as two workers cut them
        answers.absorb(lot, _cut_answer(lot, 2, 0.02))
    resent: list[int] = []
    while answers.again:
        lot = answers.next_again(1 << 30)
        assert lot is not None and lot.items == list(range(lot.start, lot.start + len(lot.items)))
        resent += lot.items
    assert resent == [i for i in range(200) if i % 50 > 1]


def test_items_that_turn_slow_inside_a_budgeted_chunk_spread_over_the_workers() -> None:
    """3,000 tiny items, then 300 of 10 ms: the blind plan's last chunk holds the turn. Its
    loop looked at the clock between blocks of 1, 1, 2 ... 1,024 items, and the block holding
    the turn ran every slow item on one worker (3.06 s against 1.5 s). The budget now ends the
    chunk within an item of running out, and the slow rest spreads over both workers."""
    seconds = [0.0] * 3000 + [0.01] * 300
    with sp.Engine(workers=2) as eng:
        report = eng.map(_tasks.pid_after_nap, seconds)
    assert [o.index for o in report] == list(range(len(seconds)))
    assert all(o.ok and o.attempts == 1 for o in report)
    slow = Counter(o.value for o in report if seconds[o.index])
    assert len(slow) == 2, slow


def test_a_budgeted_tiny_loop_stops_within_an_item_of_its_budget() -> None:
    """In the worker's tiny-item loop (no clock read per item): items that turn slow after
    tiny ones stop the chunk after the running one, whether they wait (the GIL is free) or
    compute in Python (the budget thread waits for the GIL: the switch interval)."""
    tiny = run_chunk(abs, list(range(-5000, 0)), per_item_clock=False, budget=5.0)
    assert tiny.values == list(range(5000, 0, -1))  # all of them, well within the budget
    # The thread now lingers, waking every 5 s: a shorter budget must wake it; the next one
    # is armed while it lingers at that beat, without a wake-up.
    for slow in (_nap, _spin):
        items: list[Any] = [0.0] * 3000 + [0.01] * 50
        result = run_chunk(slow, items, per_item_clock=False, budget=0.02)
        assert 3000 < len(result.values) < 3000 + 25, (slow, len(result.values))  # of 3,050
        assert result.errors is None


def test_a_small_first_item_goes_with_the_first_planned_chunk() -> None:
    """The first item goes to the outbox alone, so that its encoding gives the payload per item;
    when it is small it is taken back and goes with the blind plan's first chunk (alone, it
    cost a round trip and its worker's planned chunk waited behind it). Items of one tiny-loop
    chunk share a worker and a duration (the chunk's mean); items of two chunks do not."""
    with sp.Engine(workers=2) as eng:
        report = eng.map(abs, range(-2000, 0))
    assert report.values == list(range(2000, 0, -1))
    assert all(o.attempts == 1 for o in report)
    first, second = report[0], report[1]
    assert (first.worker, first.duration) == (second.worker, second.duration)


def test_a_first_item_in_shared_memory_still_goes_alone() -> None:
    """A first item whose array went to shared memory is not encoded twice: it stays alone."""
    np = pytest.importorskip("numpy")
    arrays = [np.full(200_000, i, dtype=np.float64) for i in range(2)]  # 1.6 MB each, 2 in 4 MiB
    with sp.Engine(workers=2, shm_threshold=1 << 20) as eng:
        report = eng.map(len, arrays)
    assert report.values == [200_000, 200_000]
    assert report[0].duration != report[1].duration  # two chunks, each timed on its own


def test_a_batch_that_must_not_rerun_innocents_is_not_planned_blind() -> None:
    """A crash loses the results of its whole chunk, and under rerun_innocent=False they are
    reported lost rather than run again: one blind chunk per worker lost half such a batch to
    one crash. Its chunks are sized from what its first answers say instead (single items
    until then)."""
    with sp.Engine(workers=2, rerun_innocent=False) as eng:
        report = eng.map(abs, range(-2000, 0))
    assert report.ok and report.values == list(range(2000, 0, -1))
    assert report.stats.chunks > 2, report.stats  # planned blind: 2 (one per worker)


@pytest.mark.parametrize("head", [[0], [0] * 50], ids=["one-small-first", "fifty-small-first"])
def test_a_misjudged_payload_never_floods_shared_memory(head: list[Any]) -> None:
    """Chunks are sized from the payload per item seen so far (the blind plan: from the first
    item alone). Small items then 40 arrays of 4 MiB made chunks of 20 arrays, all in /dev/shm
    at once (480 MiB for 60 arrays of 8 MiB, where the in-flight window holds 40). A chunk
    that would pass four times the chunk bound is taken back unsent, and the payload is learnt
    again item by item: the workers never see more than the window's worth."""
    np = pytest.importorskip("numpy")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    arrays = [np.full(1 << 19, i, dtype=np.float64) for i in range(40)]  # 4 MiB each
    seen = functools.partial(_tasks.shm_bytes_of, f"stagepool-{os.getpid()}-")
    with sp.Engine(workers=2) as eng:
        report = eng.map(seen, head + arrays)
    assert report.ok and len(report) == len(head) + 40
    assert all(o.attempts == 1 for o in report)
    assert max(report.values) <= 48 << 20, max(report.values) >> 20  # before: 80-160 MiB


def test_items_given_back_are_read_again_first() -> None:
    """The batch's source gives back a chunk taken back unsent (an over-budget payload) and
    reads it again, before the rest, from a list as from an iterator."""
    for items in (list(range(10)), iter(range(10))):
        source = ItemSource(iter(items) if isinstance(items, list) else items,
                            items if isinstance(items, list) else None)
        first = source.read(4)
        source.unread(first)
        assert source.available() == 1 << 30 and not source.exhausted
        assert source.read(2) == [0, 1]
        assert source.read(5) == [2, 3, 4, 5, 6]
        rest = source.read(10)
        assert rest == [7, 8, 9] and source.exhausted
        source.unread(rest[1:])
        assert not source.exhausted and source.skip_rest() == 2


@given(n=st.integers(0, 40), as_list=st.booleans(),
       steps=st.lists(st.tuples(st.integers(1, 12), st.booleans()), max_size=30))
def test_reads_and_give_backs_yield_every_item_once_in_order(
        n: int, as_list: bool, steps: list[tuple[int, bool]]) -> None:
    """Any mix of reads and give-backs (each giving back the whole last read, as the batch
    does) yields the input exactly once, in order, and says it is exhausted exactly at its
    end."""
    source = ItemSource(iter(range(n)), list(range(n)) if as_list else None)
    taken: list[int] = []
    for size, give_back in steps:
        chunk = source.read(size)
        if give_back:
            source.unread(chunk)
        else:
            taken += chunk
    while not source.exhausted:
        taken += source.read(7)
    assert taken == list(range(n))
    assert source.read(3) == [] and source.skip_rest() == 0


def test_an_overrun_forgets_the_payload_and_any_blind_plan() -> None:
    sizer = ChunkSizer(None, workers=2, total=1000)
    sizer.blind = True
    sizer.observe_payload(1, 30)
    size = sizer.next_size(1)
    assert size > 1 and sizer.payload_budget(size) is not None
    sizer.observe_overrun(size)
    assert sizer.next_size(1) == 1  # the payload per item is learnt again
    sizer.observe_payload(1, 30)
    assert sizer.next_size(2) == 1  # no blind plan from one item's payload again
    assert sizer.payload_budget(1) is None
    assert ChunkSizer(64, workers=2, total=1000).payload_budget(64) is None  # the user's size


def _overruns(payloads: list[int], *, known_length: bool) -> int:
    """How many chunks the batch's sizing loop (Batch._take) takes back over budget while
    it cuts ``payloads`` (each item's encoded bytes) into chunks; tiny items of 2 us each."""
    sizer = ChunkSizer(None, workers=2, total=len(payloads) if known_length else None)
    sizer.blind = known_length
    at = overruns = 0
    while at < len(payloads):
        size = min(sizer.next_size(at), len(payloads) - at)
        budget = sizer.payload_budget(size)
        if budget is not None and sum(payloads[at:at + size]) > budget:
            overruns += 1
            sizer.observe_overrun(size)
            continue
        sizer.observe_payload(size, sum(payloads[at:at + size]))
        sizer.observe(size, size * 2e-6)
        at += size
    return overruns


@pytest.mark.parametrize("known_length", [True, False], ids=["list", "iterator"])
def test_small_items_ahead_of_big_ones_are_not_refused_over_and_over(known_length: bool) -> None:
    """Each small item learnt again after an overrun sized the next chunk as big as the refused
    one, which reached the arrays and was refused again, re-encoding up to 16 MiB each time:
    2,000 small items then 2 MiB arrays cost 2,000 refusals from an iterator (and 32 from a
    list; 7x slower than before refusals existed). Chunks now shrink after each overrun."""
    head = [30] * 2000 + [2 << 20] * 100
    assert _overruns(head, known_length=known_length) <= 10
    blocks = ([30] * 1000 + [3 << 20] * 50) * 3  # small and big by turns
    assert _overruns(blocks, known_length=known_length) <= 15


def test_small_items_ahead_of_arrays_from_a_generator_run_once_each() -> None:
    """The same through real workers: every item runs once, in order, and the batch does not
    re-encode its arrays over and over (counted in this process, where chunks are encoded)."""
    np = pytest.importorskip("numpy")
    refusals = Counter[str]()
    real_init = OverBudget.__init__

    def counting_init(self: OverBudget, budget: int) -> None:
        refusals["n"] += 1
        real_init(self, budget)

    items = [*range(1000), *(np.full(1 << 18, i, dtype=np.float64) for i in range(40))]
    with pytest.MonkeyPatch.context() as patch, sp.Engine(workers=2) as eng:
        patch.setattr(OverBudget, "__init__", counting_init)
        report = eng.map(id, iter(items), timeout=60)  # id: a cheap answer for any item
    assert report.ok and all(o.attempts == 1 for o in report), report.summary()
    assert [o.index for o in report] == list(range(1040))
    assert refusals["n"] <= 10, refusals  # before: ~1,000 (one per small item)


def test_a_read_from_an_iterator_stops_before_the_arrays_that_would_pass_its_bound() -> None:
    np = pytest.importorskip("numpy")
    big = [np.zeros(1 << 19) for _ in range(3)]  # 4 MiB each
    it = iter([1, 2, *big, 3])
    chunk: list[Any] = []
    assert read_within(it, 100, 6 << 20, chunk) is big[1]  # read, not kept: the caller keeps it
    assert chunk == [1, 2, big[0]] and next(it) is big[2]
    chunk = []
    assert read_within(iter(range(5)), 3, 1, chunk) is NOTHING and chunk == [0, 1, 2]

    def failing() -> Iterator[int]:
        yield from (1, 2)
        raise ValueError("source broke")

    chunk = []
    with pytest.raises(ValueError, match="source broke"):
        read_within(failing(), 10, 1 << 20, chunk)
    assert chunk == [1, 2]  # what came before the failure is kept


def test_an_item_source_gives_back_the_item_over_its_read_bound() -> None:
    np = pytest.importorskip("numpy")
    big = [np.zeros(1 << 19) for _ in range(2)]
    source = ItemSource(iter([0, big[0], big[1], 1]))
    assert source.read(10, 1 << 20) == [0]  # stops before the first array
    assert source.read(10, 1 << 20)[0] is big[0]  # given back: it goes alone
    assert source.read(10, 1 << 20)[0] is big[1]  # alone: the first item always goes
    assert source.read(10, 1 << 20) == [1] and source.exhausted


@pytest.mark.parametrize("shape", ["array", "pair"])
def test_a_generator_of_small_items_then_arrays_is_not_read_ahead_of_the_window(
        shape: str) -> None:
    """Chunks were cut by count from the small items' payload: a count-sized read (up to 4,096
    items from an iterator) pulled every later array of the stream into this process before
    any was encoded (1,000 x 4 MiB: +4 GB). Now a read stops at the chunk's byte bound, so the
    arrays alive at once in the parent stay within the in-flight window; also when each array
    comes in a ``(meta, array)`` pair (a segment and its samples), which read 64-200 at once."""
    np = pytest.importorskip("numpy")
    alive: set[int] = set()
    most = 0

    def stream() -> Iterator[Any]:
        nonlocal most
        yield from range(3000)
        for i in range(200):
            arr = np.full(1 << 17, i, dtype=np.float64)  # 1 MiB
            alive.add(i)
            weakref.finalize(arr, alive.discard, i)
            most = max(most, len(alive))
            yield arr if shape == "array" else (i, arr)

    with sp.Engine(workers=2) as eng:
        outcomes = list(eng.imap(id, stream(), timeout=60))  # id: a cheap answer for any item
    assert [o.index for o in outcomes] == list(range(3200)) and all(o.ok for o in outcomes)
    assert all(o.attempts == 1 for o in outcomes)
    assert most <= 20, most  # before: 64-200 (all of them) in three runs


def test_a_callable_timeout_runs_once_per_item_when_a_chunk_is_taken_back() -> None:
    """Each item's limit was computed before its chunk was encoded, so a chunk taken back over
    budget had called ``timeout`` for all its items, which were read and called again: 300
    small items then 40 arrays of 2 MiB called it 523-644 times for 340 items (up to 5 times
    for an array)."""
    np = pytest.importorskip("numpy")
    calls = Counter[int]()

    def limit(item: Any) -> float:
        calls[item if isinstance(item, int) else 1000 + int(item[0])] += 1
        return 60.0

    items = [*range(300), *(np.full(1 << 18, i, dtype=np.float64) for i in range(40))]
    with sp.Engine(workers=2) as eng:
        report = eng.map(id, items, timeout=limit)  # id: a cheap answer for any item
    assert report.ok and all(o.attempts == 1 for o in report), report.summary()
    assert len(calls) == 340, len(calls)
    # The first item is encoded alone, then again with the blind plan's first chunk: 2 calls.
    assert [i for i, n in calls.items() if n > 1] in ([], [0]), sum(calls.values())
