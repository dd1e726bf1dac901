"""The backend seam without processes: a scriptable fake backend drives the real batch driver, and
the local backend's fair-share scheduler is exercised as the pure bookkeeping it is.

The fake answers as a backend without exact blame would ("a worker died while on this chunk, item
unknown"), so these tests prove the driver's halving finds exactly the guilty item, keeps the
innocent, and accounts for every item once, in milliseconds. The real-process suite proves the
plumbing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from stagepool._answers import BatchPolicy
from stagepool._backends import Capabilities, Group, LaneDied, Task
from stagepool._backends._fairshare import UNKNOWN_CHUNK_SECONDS, FairShare
from stagepool._backends._serial import InProcessCodec
from stagepool._batch import Batch, BatchSpec
from stagepool._streams import outcomes, run_to_report
from stagepool._worker import run_chunk

BLIND = Capabilities(exact_blame=False, survives_crash=True, hard_timeouts=False,
                     kills_running=False, shared_memory=False, memory_limits=False,
                     processes=False, serializes=False)


class BlindBackend:
    """Runs chunks in-process; a chunk holding a "poison" item kills its imaginary worker, and the
    answer cannot say which item it was on (offset -1). Counts how often each item ran."""

    def __init__(self, poison: set[int], workers: int = 2) -> None:
        self.poison, self._workers = poison, workers
        self.codec = InProcessCodec()
        self.capabilities = BLIND
        self.runs: Counter[int] = Counter()
        self.chunks: list[list[int]] = []

    @property
    def workers(self) -> int:
        return self._workers

    def submit_many(self, tasks: list[Task]) -> None:
        for task in tasks:
            items: list[int] = task.items
            self.chunks.append(list(items))
            if any(item in self.poison for item in items):
                for item in items[: next(i for i, x in enumerate(items) if x in self.poison) + 1]:
                    self.runs[item] += 1  # ran up to and including the poison, then "died"
                task.on_done(task, LaneDied(4242, -9, -1, "crash", "", "fake-worker"))
                continue
            self.runs.update(items)
            task.on_done(task, run_chunk(task.fn, items))

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        group.cancelled = True

    def withdraw_task(self, task: Task) -> None:
        pass

    def worker_pids(self) -> list[int]:
        return []

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        pass


def _spec(items: list[int], chunk_size: int | None, retries: int = 0) -> BatchSpec:
    policy = BatchPolicy(retries=retries, retry_on=("crash",), max_in_flight=3)
    return BatchSpec(lambda x: x * 10, items, len(items), chunk_size, None, policy)


def test_a_backend_that_cannot_blame_still_gets_exactly_the_guilty_item() -> None:
    backend = BlindBackend(poison={13})
    report = run_to_report(Batch(backend, _spec(list(range(40)), chunk_size=16)))
    assert [o.kind for o in report] == ["ok"] * 13 + ["crash"] + ["ok"] * 26
    assert report.values == [10 * i for i in range(40) if i != 13]
    crash = report[13].error
    assert "worker 4242 (fake-worker)" in str(crash) and "item 13" in str(crash)
    # The culprit was found by halving: the last chunk it was in held it alone.
    assert [c for c in backend.chunks if 13 in c][-1] == [13]
    assert len([c for c in backend.chunks if 13 in c]) <= 1 + 4  # 16 -> 8 -> 4 -> 2 -> 1


def test_retries_apply_after_the_halving_found_the_culprit() -> None:
    backend = BlindBackend(poison={5})
    report = run_to_report(Batch(backend, _spec(list(range(8)), chunk_size=8, retries=2)))
    assert report[5].kind == "crash" and report.stats.retries == 2
    assert all(o.ok for i, o in enumerate(report) if i != 5)
    # Every run counts: exactly for the culprit and the items before it (they ran each time);
    # a backend that cannot name the item cannot say whether the later ones ran: never fewer.
    assert report[5].attempts == backend.runs[5] == 6  # 3 halvings + the first run + 2 retries
    assert all(o.attempts >= backend.runs[o.index] for o in report)


def test_rerun_innocent_false_reports_instead_of_running_twice() -> None:
    backend = BlindBackend(poison={5})
    spec = _spec(list(range(8)), chunk_size=8)
    spec = dataclasses.replace(spec, policy=dataclasses.replace(spec.policy, rerun_innocent=False))
    report = run_to_report(Batch(backend, spec))
    assert max(backend.runs.values()) == 1  # nothing ran twice
    # Without exact blame every item of the chunk may have run: none is run again.
    assert [o.kind for o in report] == ["crash"] * 8
    assert "not run again because rerun_innocent=False" in str(report[0].error)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), chunk=st.one_of(st.none(), st.integers(1, 33)),
       poison=st.sets(st.integers(0, 119), max_size=6), ordered=st.booleans(),
       stream=st.booleans())
def test_any_mix_gives_one_outcome_per_item(n: int, chunk: int | None, poison: set[int],
                                            ordered: bool, stream: bool) -> None:
    backend = BlindBackend(poison={p for p in poison if p < n})
    spec = _spec(list(range(n)), chunk)
    if stream:
        got = list(outcomes(lambda: Batch(backend, spec), ordered))
        if not ordered:
            got.sort(key=lambda o: o.index)
    else:
        got = list(run_to_report(Batch(backend, spec)))
    assert [o.index for o in got] == list(range(n))
    for o in got:
        assert o.attempts >= backend.runs[o.index], o  # a run is never hidden
        if o.index in backend.poison:
            assert o.kind == "crash", o
        else:
            assert o.ok and o.value == 10 * o.index, o


# ---- the fair-share scheduler ---------------------------------------------------------------------


def _task(group: Group, expected: float | None = 0.01, n: int = 1) -> Task:
    return Task(group, 0, None, [0] * n, n, lambda t, r: None, expected=expected)


def test_the_least_served_group_goes_next() -> None:
    share, big, small = FairShare(), Group(), Group()
    share.queue([_task(big, 1.0) for _ in range(5)])
    first = share.take(lambda t: True)
    assert first is not None and first.group is big
    share.queue([_task(small, 0.01) for _ in range(5)])  # arrives level with big, not at zero
    assert small.served == big.served == 1.0
    taken = [share.take(lambda t: True) for _ in range(4)]
    # A tie goes to the older group; then small's short chunks keep it the least served.
    assert [t.group if t else None for t in taken] == [big, small, small, small]


def test_unknown_durations_count_as_a_small_default() -> None:
    share, group = FairShare(), Group()
    share.queue([_task(group, None)])
    assert share.take(lambda t: True) is not None
    assert group.served == pytest.approx(UNKNOWN_CHUNK_SECONDS)


def test_a_withdrawn_group_is_refused_and_never_taken() -> None:
    share, group, other = FairShare(), Group(), Group()
    share.queue([_task(group), _task(group), _task(other)])
    assert len(share.withdraw(group)) == 2
    group.cancelled = True
    late = _task(group)
    assert share.queue([late]) == [late]  # refused: it would never run
    taken = share.take(lambda t: True)
    assert taken is not None and taken.group is other
    assert share.take(lambda t: True) is None and not share


def test_requeued_tasks_go_first_in_their_order() -> None:
    share, group = FairShare(), Group()
    a, b, c = _task(group), _task(group), _task(group)
    share.queue([c])
    share.queue([a, b], front=True)
    assert [share.take(lambda t: True) for _ in range(3)] == [a, b, c]


def test_take_respects_what_the_worker_accepts() -> None:
    share, group = FairShare(), Group()
    big = _task(group, n=50)
    share.queue([big])
    assert share.take(lambda t: t.n_items < 10) is None
    assert share.withdraw_task(big) and not share.withdraw_task(big)


def test_drain_empties_every_group() -> None:
    share = FairShare()
    groups = [Group() for _ in range(3)]
    share.queue([_task(g) for g in groups for _ in range(2)])
    assert len(share.drain()) == 6 and not share
