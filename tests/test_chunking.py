"""The chunk sizer on its own: a pure decision from what a batch has observed so far."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagepool import _chunking
from stagepool._chunking import (
    BLIND_SHARES,
    BUDGET_SLACK,
    CHUNK_BYTES,
    MAX_STREAM_CHUNK,
    TAIL_SHARES,
    ChunkSizer,
    plan_ends,
)

MiB = 1 << 20


def test_an_auto_batch_starts_with_one_item_to_learn_its_payload() -> None:
    sizer = ChunkSizer(None, workers=2, total=100_000)
    assert sizer.next_size(0) == 1
    sizer.observe_payload(1, 40)  # a small item
    assert sizer.next_size(1) == 1  # and single items while their cost is unknown


def test_items_of_unknown_cost_go_one_by_one_until_one_comes_back() -> None:
    # 0.3 s items: a blind chunk of 8 held the batch's first outcomes back 2.4 s (issue 15).
    sizer = ChunkSizer(None, workers=2, total=1000)
    sizer.observe_payload(1, 40)
    assert [sizer.next_size(n) for n in range(1, 6)] == [1] * 5
    sizer.observe(1, 0.3)
    assert sizer.next_size(6) == 1  # slow: still one at a time
    fast = ChunkSizer(None, workers=2, total=100_000)
    fast.observe_payload(1, 40)
    fast.observe(1, 1e-6)
    assert fast.next_size(5) > 1000  # tiny: learnt from the first answer


def test_a_fixed_chunk_size_is_kept_whatever_the_payload() -> None:
    sizer = ChunkSizer(16, workers=2, total=None)
    assert sizer.next_size(0) == 16
    sizer.observe_payload(16, 16 * 8 * MiB)
    assert sizer.next_size(16) == 16


def test_big_items_travel_one_per_chunk_even_when_fast() -> None:
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe_payload(1, 8 * MiB)
    sizer.observe(1, 1e-4)  # fast enough that time alone would ask for 200 per chunk
    assert sizer.next_size(1) == 1


@given(item_bytes=st.integers(1, 64 * MiB), per_item=st.floats(1e-7, 1.0),
       total=st.one_of(st.none(), st.integers(1, 10**7)), workers=st.integers(1, 64))
def test_a_chunk_never_carries_more_than_chunk_bytes_unless_it_is_one_item(
        item_bytes: int, per_item: float, total: int | None, workers: int) -> None:
    sizer = ChunkSizer(None, workers=workers, total=total)
    sizer.observe_payload(3, 3 * item_bytes)
    sizer.observe(3, 3 * per_item)
    size = sizer.next_size(3)
    assert size >= 1
    assert size == 1 or size * item_bytes <= CHUNK_BYTES
    if total is None:
        assert size <= MAX_STREAM_CHUNK


def test_a_backend_with_a_long_round_trip_gets_longer_chunks() -> None:
    """On a cluster each chunk is a scheduler round trip of ~10-20 ms: 20 ms chunks of 20 ms
    items (one item each) left the workers idle about half the time."""
    local, cluster = (ChunkSizer(None, workers=2, total=200, target=t) for t in (0.02, 0.2))
    for sizer in (local, cluster):
        sizer.observe_payload(1, 100)
        sizer.observe(1, 0.02)
    assert local.next_size(1) == 1
    assert cluster.next_size(1) == 10  # 0.2 s of 20 ms items
    # and the planned tail holds chunks of at least ten times the local floor of work
    local_tail, cluster_tail = (ChunkSizer(None, workers=2, total=10**6, target=t)
                                for t in (0.02, 0.2))
    for sizer in (local_tail, cluster_tail):
        sizer.observe_payload(1, 100)
        sizer.observe(1, 1e-6)
    start = 10**6 - 8_000  # 8 ms of work left: 16 local floors, 1.6 cluster ones
    assert cluster_tail.next_size(start) == 8_000
    assert local_tail.next_size(start) == 1_500 and local_tail.planned_chunks(start) == 8


def test_the_little_work_left_of_a_known_batch_is_planned_once() -> None:
    """20,000 tiny items: after the first answers the rest is planned up front, TAIL_SHARES
    shares per worker (as multiprocessing.Pool.map splits), the last half of the chunks half
    shares so the workers end together; and the whole plan may be in flight at once."""
    sizer = ChunkSizer(None, workers=2, total=20_000)
    sizer.observe_payload(2, 20)
    sizer.observe(2, 2 * 3e-6)  # a lone item measures high: 3 us
    submitted, sizes = 2, []
    while submitted < 20_000:
        if not sizes:
            assert sizer.planned_chunks(submitted) == 0  # not planned before it is asked
        size = min(sizer.next_size(submitted), 20_000 - submitted)
        sizes.append(size)
        submitted += size
        assert sizer.planned_chunks(submitted) == TAIL_SHARES * 2 - len(sizes)
    assert len(sizes) == TAIL_SHARES * 2
    big, small = sizes[:TAIL_SHARES], sizes[TAIL_SHARES:]
    assert max(big) - min(big) <= 1 and max(small) - min(small) <= 1
    assert abs(max(big) - 3 * max(small)) <= 3


def test_a_plan_whose_payload_is_big_goes_through_the_window() -> None:
    sizer = ChunkSizer(None, workers=2, total=20_000)
    sizer.observe_payload(1, 1000)  # 20 MB in all: more than CHUNK_BYTES in flight
    sizer.observe(1, 1e-6)
    assert sizer.next_size(1) > 1
    assert sizer.planned_chunks(1) == 0


def test_a_long_batch_is_planned_only_near_its_end() -> None:
    sizer = ChunkSizer(None, workers=2, total=10_000_000)
    sizer.observe_payload(1, 20)
    sizer.observe(1000, 1000 * 3e-7)
    first = sizer.next_size(1000)
    assert first < 10_000_000 // (TAIL_SHARES * 2)  # plenty of work left: no plan yet
    assert sizer.planned_chunks(1000 + first) == 0
    start = 10_000_000 - 200_000  # 60 ms of work left: planned, and it stays
    size = sizer.next_size(start)
    assert size == 37_500 and sizer.next_size(start + size) == size
    assert sizer.planned_chunks(start) == TAIL_SHARES * 2


@given(n=st.integers(1, 10**6), workers=st.integers(1, 64), worth=st.integers(0, 1000))
def test_a_plan_covers_the_rest_exactly_once(n: int, workers: int, worth: int) -> None:
    ends = plan_ends(10, n, workers, worth)
    assert ends == sorted(set(ends)) and ends[0] > 10 and ends[-1] == 10 + n
    assert len(ends) <= min(n, TAIL_SHARES * workers, max(1, worth))


def test_in_flight_one_per_worker_while_learning_then_the_whole_small_plan() -> None:
    sizer = ChunkSizer(None, workers=2, total=20_000)
    assert sizer.in_flight_limit(5, 0, 0) == 2  # cost unknown: a single item per worker
    sizer.observe_payload(2, 20)
    sizer.observe(2, 2e-6)
    assert sizer.in_flight_limit(5, 0, 2) == 5  # not planned until the next size is asked
    sizer.next_size(2)
    assert sizer.in_flight_limit(5, 1, 2) == 1 + TAIL_SHARES * 2
    assert ChunkSizer(64, workers=2, total=20_000).in_flight_limit(5, 0, 0) == 5  # fixed size


def blind_sizer(total: int, item_bytes: int = 40) -> ChunkSizer:
    sizer = ChunkSizer(None, workers=2, total=total)
    sizer.blind = True  # a report of known length on a backend that cuts chunks
    assert sizer.next_size(0) == 1  # the first item alone: its encoding gives the payload
    sizer.observe_payload(1, item_bytes)
    return sizer


def test_a_small_report_is_planned_at_once_before_any_cost_is_known() -> None:
    """No round trip to learn that 20,000 items are tiny (issue 15): the rest goes out at once,
    each chunk with a budget after which the worker stops it, in the tiny-item loop."""
    sizer = blind_sizer(20_000)
    sizes, at = [], 1
    while at < 20_000:
        sizes.append(sizer.next_size(at))
        assert sizer.budget(8) == sizer.target and not sizer.per_item_clock()
        at += sizes[-1]
    assert at == 20_000 and len(sizes) == BLIND_SHARES * 2
    assert sizer.in_flight_limit(5, 1, 1) >= 1 + len(sizes)  # all of it in one hand-off


def test_a_blind_plan_needs_a_known_length_a_small_payload_and_a_cutting_backend() -> None:
    assert blind_sizer(CHUNK_BYTES // 40 * 2).next_size(1) == 1  # too much to encode at once
    unsized = ChunkSizer(None, workers=2, total=None)
    unsized.blind = True
    unsized.observe_payload(1, 40)
    assert unsized.next_size(1) == 1
    streaming = ChunkSizer(None, workers=2, total=20_000)  # blind stays False: a stream
    streaming.observe_payload(1, 40)
    assert streaming.next_size(1) == 1 and streaming.budget(8) is None


def test_a_chunk_sized_from_a_learnt_cost_has_a_loose_budget() -> None:
    """The first items' cost says nothing of later ones: a chunk may run ``BUDGET_SLACK`` times
    its estimate (at least the target), then it is cut (issue 15 attack); a ``chunk_size`` the
    user fixed is never cut."""
    sizer = ChunkSizer(None, workers=2, total=None)
    assert sizer.budget(10) is None  # nothing known, no blind plan
    sizer.observe(100, 100 * 1e-6)  # 1 us an item
    assert sizer.budget(10) == sizer.target
    assert sizer.budget(100_000) == pytest.approx(BUDGET_SLACK * 0.1)
    fixed = ChunkSizer(10, workers=2, total=None)
    fixed.observe(100, 100 * 1e-6)
    assert fixed.budget(10) is None


def test_a_cut_chunk_ends_the_blind_plan_and_its_rest_is_sized_from_what_was_learnt() -> None:
    sizer = blind_sizer(20_000)
    sizer.next_size(1)
    sizer.observe(200, 0.02)  # cut after 200 items of 100 us: not tiny after all
    sizer.observe_cut()
    assert sizer.budget(8) == sizer.target and sizer.planned_chunks(1) == 0
    assert sizer.rest_size(19_000) == 200  # about the target of 20 ms
    assert sizer.rest_size(800) == 100  # a tail share of what is left
    slow = blind_sizer(100)
    slow.next_size(1)
    slow.observe(1, 0.3)
    slow.observe_cut()
    assert slow.rest_size(98) == 1  # slow items go one by one


def test_the_payload_per_item_follows_the_last_chunks_not_the_whole_batch() -> None:
    """Twenty 8 MiB arrays, then tiny items: a mean over the whole batch kept chunks at one
    item for thousands of items (355 chunks for 50,000 ints after 20 arrays); the estimate
    now spans the last PAYLOAD_CHUNKS chunks, so chunks grow again after a few."""
    sizer = ChunkSizer(None, 2, None)
    for _ in range(20):
        sizer.observe_payload(1, 8 << 20)
        sizer.observe(1, 1e-6)
    assert sizer.next_size(20) == 1  # still arrays in view: one at a time
    for _ in range(_chunking.PAYLOAD_CHUNKS):
        sizer.observe_payload(1, 30)
        sizer.observe(1, 1e-6)
    assert sizer.next_size(20 + _chunking.PAYLOAD_CHUNKS) == _chunking.MAX_STREAM_CHUNK
