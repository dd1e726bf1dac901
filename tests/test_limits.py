"""Deadlines of running items, as pure functions of a task and a slot's state (no processes), and
the verdicts read from a real shared record."""

from __future__ import annotations

import os
import time
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagepool._backends import Group, Task
from stagepool._backends._local._lanes import Lane
from stagepool._backends._local._limits import (
    MIN_SAMPLE_INTERVAL,
    POLL_INTERVAL,
    SAMPLES,
    Limits,
    Seen,
    deadline_of,
    sampled_deadline,
)
from stagepool._backends._local._record import SharedRecord, SlotState
from stagepool._worker import PHASE_RUN
from stagepool._worker_loop import F_CHUNK, F_OFFSET, F_PHASE, F_START, Record


def tiny_task(timeouts: tuple[float, ...]) -> Task:
    return Task(Group(), 1, None, b"", len(timeouts), lambda task, result: None, timeouts,
                per_item_clock=False)


def test_a_tiny_item_is_stopped_after_its_offset_stays_put_for_its_limit() -> None:
    task = tiny_task((2.0,) * 100)
    state = SlotState(task.id, 40, PHASE_RUN, 0.0)  # no start time: tiny items write none
    deadline, seen = sampled_deadline(task, state, 10.0, None)
    assert seen == Seen(task.id, 40, 10.0)
    assert deadline == 10.0 + 2.0 / SAMPLES  # look again soon: it may be a hang
    deadline, seen = sampled_deadline(task, state, 11.0, seen)
    assert seen == Seen(task.id, 40, 10.0)  # the same item since 10.0
    assert deadline == 11.0 + 2.0 / SAMPLES
    deadline, _ = sampled_deadline(task, state, 11.9, seen)
    assert deadline == 12.0  # 10.0 + its limit: expired from then on


def test_a_tiny_item_that_moved_on_starts_a_new_watch() -> None:
    task = tiny_task((2.0,) * 100)
    seen = Seen(task.id, 40, 10.0)
    deadline, seen2 = sampled_deadline(task, SlotState(task.id, 41, PHASE_RUN, 0.0), 11.99, seen)
    assert seen2 == Seen(task.id, 41, 11.99)
    assert deadline is not None and deadline > 11.99 + 2.0 / SAMPLES - 1e-9


def test_a_chunk_not_started_yet_is_looked_at_again_without_a_watch() -> None:
    task = tiny_task((2.0,) * 10)
    deadline, seen = sampled_deadline(task, SlotState(task.id - 1, 3, PHASE_RUN, 0.0), 5.0, None)
    assert seen is None and deadline is not None and 5.0 < deadline < 6.0


def test_a_chunk_not_started_yet_is_looked_at_again_within_a_sample_interval() -> None:
    """A look at a chunk not started yet came back after POLL_INTERVAL (50 ms) whatever the
    limit: an item that started meanwhile was first seen up to 50 ms late, and one that ran 50
    ms under timeout=0.01 came back "ok" (issue 15 attack: items 3 and 53 of a fresh engine's
    map). Such a look now comes back within one sample interval of the shortest limit."""
    task = tiny_task((0.01,) * 10)
    not_started = SlotState(task.id - 1, 3, PHASE_RUN, 0.0)
    deadline, _ = sampled_deadline(task, not_started, 5.0, None)
    assert deadline is not None and deadline <= 5.0 + max(0.01 / SAMPLES, MIN_SAMPLE_INTERVAL)
    exact = Task(Group(), 1, None, b"", 3, lambda task, result: None, (5.0, 0.01, 5.0))
    looked = deadline_of(exact, SlotState(exact.id - 1, 0, PHASE_RUN, 0.0), 5.0)
    assert looked is not None and looked <= 5.0 + max(0.01 / SAMPLES, MIN_SAMPLE_INTERVAL)


def test_without_timeouts_there_is_no_deadline() -> None:
    task = Task(Group(), 1, None, b"", 3, lambda task, result: None, None, per_item_clock=False)
    assert sampled_deadline(task, SlotState(task.id, 0, PHASE_RUN, 0.0), 1.0, None) == (None, None)


@given(limit=st.floats(1e-3, 1e4), looks=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_a_sampled_deadline_is_never_early_and_at_most_one_interval_late(
        limit: float, looks: list[float]) -> None:
    """Whatever the moments the pool thread looks, an item never expires before it has run for
    its limit, and the next look is due at most limit / SAMPLES (or the minimum interval) away."""
    task = tiny_task((limit,) * 5)
    state = SlotState(task.id, 2, PHASE_RUN, 0.0)
    started, now, seen = 100.0, 100.0, None
    for step in looks:
        now += step * limit
        deadline, seen = sampled_deadline(task, state, now, seen)
        assert deadline is not None and seen is not None
        assert deadline >= started + limit or deadline > now  # expired only after its limit
        assert deadline <= now + max(limit / SAMPLES, MIN_SAMPLE_INTERVAL) + 1e-9


def test_a_uniform_timeout_needs_no_per_item_table() -> None:
    """timeout=N gives every item the same limit: the later-items term is that number."""
    task = Task(Group(), 1, None, b"", 3, lambda task, result: None, (5.0, 5.0, 5.0))
    state = SlotState(task.id, 0, PHASE_RUN, 100.0)
    assert deadline_of(task, state, 101.0) == 105.0
    last = SlotState(task.id, 2, PHASE_RUN, 100.0)
    assert deadline_of(task, last, 101.0) == 105.0  # no later item: its own limit only


def test_a_chunk_whose_first_item_has_not_started_never_expires_on_a_stale_start_time() -> None:
    """Between the worker's "running this chunk" and its first item's start time, the slot holds
    offset -1 and the start time of an item long gone (0.0 in a fresh worker). Read then, that
    start made a deadline in the past: tiny_ab's warm-up saw a worker killed as "timeout" at once
    (timeout=60) while it began a chunk; an engine idle for longer than its timeout could too."""
    task = Task(Group(), 1, None, b"", 3, lambda task, result: None, (60.0,) * 3)
    for stale in (0.0, 40.0):  # a fresh slot; an item that started 60 s before now
        deadline = deadline_of(task, SlotState(task.id, -1, PHASE_RUN, stale), 100.0)
        assert deadline is not None and deadline > 100.0


def test_a_slot_read_while_its_worker_moves_to_a_shorter_chunk_is_looked_at_again() -> None:
    """The pool thread reads a slot field by field while the worker writes it. Read as the
    worker went from a 500-item chunk to a 3-item one, the slot could name the new chunk in the
    run phase with the old chunk's last offset, 499: ``timeouts[499]`` raised IndexError in the
    pool thread, which closed the engine (seen on a dask worker's lanes, 100,000 items with
    ``timeout=60``). An offset the chunk does not have is a chunk not started yet."""
    for per_item_clock in (True, False):
        task = Task(Group(), 1, None, b"", 3, lambda task, result: None, (60.0,) * 3,
                    per_item_clock=per_item_clock)
        torn = SlotState(task.id, 499, PHASE_RUN, 40.0)
        assert deadline_of(task, torn, 100.0) == 100.0 + POLL_INTERVAL
        deadline, seen = sampled_deadline(task, torn, 100.0, None)
        assert deadline == 100.0 + POLL_INTERVAL and seen is None


class _MovesOnAfterEachRead(SharedRecord):
    """A slot whose worker starts its next item right after the pool thread reads it: what a
    worker does when the item that overran ends between two reads of the pool thread."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.worker = Record(self.path, 0)

    def state(self, slot: int) -> SlotState:
        state = super().state(slot)
        self.worker.floats[F_START] = time.monotonic()
        self.worker.ints[F_OFFSET] += 1
        return state


@pytest.mark.parametrize("limit", ["timeout", "memory"])
def test_a_limit_blames_the_item_that_broke_it_not_the_next_one(limit: str) -> None:
    """The verdict read the slot twice: once for the deadline (or whether an item runs, for
    the memory cap), once more for the offset to blame. When the item that broke the limit
    ended in between, the next item (just started) was killed and blamed, and the one that
    broke it came back "ok"."""
    record = _MovesOnAfterEachRead(1)
    try:
        timeouts = (1.0,) * 10 if limit == "timeout" else None
        task = Task(Group(), 1, None, b"", 10, lambda task, result: None, timeouts)
        record.worker.ints[F_CHUNK], record.worker.ints[F_PHASE] = task.id, PHASE_RUN
        record.worker.ints[F_OFFSET] = 3
        record.worker.floats[F_START] = time.monotonic() - 5.0  # item 3 overran its 1 s
        lane = Lane(0, types.SimpleNamespace(pid=os.getpid()), None, None, None)  # type: ignore[arg-type]
        lane.tasks.append(task)
        lane.answered = True
        max_rss = 1 if limit == "memory" else None  # this process is far past 2 bytes
        assert Limits(record, None, max_rss).broken([lane]) == [(lane, limit, 3)]
    finally:
        record.close()


def test_a_numeric_timeout_shares_one_tuple_per_chunk_size() -> None:
    """Building each chunk's limits, then scanning them in the pool thread to find them all
    alike, cost a tiny map 2-9%: a numeric timeout's tuple is built once per size and known
    uniform by identity. Values and their type are the timeout's."""
    from stagepool._config import is_uniform, item_timeouts

    first = item_timeouts(60, list(range(1000)), 0)
    assert isinstance(first, tuple) and first == (60,) * 1000 and type(first[0]) is int
    assert item_timeouts(60, list(range(1000)), 5000) is first and is_uniform(first)
    floats = item_timeouts(60.0, list(range(1000)), 0)
    assert floats is not first and type(floats[0]) is float  # type: ignore[index]
    called = item_timeouts(lambda item: 60, list(range(1000)), 0)
    assert called == first and not is_uniform(called)  # type: ignore[arg-type]
    assert not is_uniform(())
