"""Every run of an item is counted in its ``attempts``, and ``rerun_innocent=False`` runs nothing
twice: real workers, real crashes and hangs, and a side-effect log that counts what really ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import _tasks
import stagepool as sp
from stagepool._worker import run_chunk


def runs_of(folder: Path, n: int) -> list[int]:
    return [os.path.getsize(folder / str(i)) if (folder / str(i)).exists() else 0
            for i in range(n)]


def test_items_that_ran_before_a_crash_count_their_second_run(tmp_path: Path) -> None:
    """One worker, one 10-item chunk, item 5 kills the worker: 0-4 had run; their results died
    with it. They run again (attempts 2, as the log says), 6-9 run once."""
    items = [(i, "crash" if i == 5 else "ok", str(tmp_path)) for i in range(10)]
    with sp.Engine(workers=1) as eng:
        report = eng.map(_tasks.logged, items, chunk_size=10)
    assert [o.kind for o in report] == ["ok"] * 5 + ["crash"] + ["ok"] * 4
    assert runs_of(tmp_path, 10) == [2] * 5 + [1] * 5
    assert [o.attempts for o in report] == runs_of(tmp_path, 10)


def test_rerun_innocent_false_runs_nothing_twice(tmp_path: Path) -> None:
    items = [(i, "crash" if i == 5 else "ok", str(tmp_path)) for i in range(10)]
    with sp.Engine(workers=1, rerun_innocent=False) as eng:
        report = eng.map(_tasks.logged, items, chunk_size=10)
        assert eng.map(_tasks.double, [1]).values == [2]  # still serving
    assert runs_of(tmp_path, 10) == [1] * 10
    assert [o.kind for o in report] == ["crash"] * 6 + ["ok"] * 4  # 0-4: ran, result lost
    assert "result was lost when worker" in str(report[0].error)
    assert "rerun_innocent=False" in str(report[0].error)
    assert [o.attempts for o in report] == [1] * 10


def test_items_that_crash_fresh_workers_in_a_row_are_not_a_start_up_failure(tmp_path: Path) -> None:
    """Each item kills the fresh worker that runs it first: after three such deaths the pool took
    it for workers dying at start-up and failed every queued item unrun (attempts said 1)."""
    items = [(i, "crash" if i < 6 else "ok", str(tmp_path)) for i in range(8)]
    with sp.Engine(workers=1) as eng:
        report = eng.map(_tasks.logged, items, chunk_size=1)
    assert [o.kind for o in report] == ["crash"] * 6 + ["ok"] * 2
    assert all(f"item {o.index}" in str(o.error) for o in report.failed)
    assert [o.attempts for o in report] == runs_of(tmp_path, 8) == [1] * 8


def test_rerun_innocent_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="rerun_innocent"):
        sp.Engine(rerun_innocent="no")  # type: ignore[arg-type]


ACTIONS = st.sampled_from(["ok"] * 8 + ["error", "crash", "crash_once", "hang"])


@pytest.fixture(scope="module", params=[0, 1], ids=["retries0", "retries1"])
def runs_engine(request: pytest.FixtureRequest) -> sp.Engine:
    eng = sp.Engine(workers=2, timeout=0.3, retries=request.param, backoff=0)
    request.addfinalizer(eng.shutdown)
    return eng


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, min_size=1, max_size=16),
       chunk=st.one_of(st.none(), st.integers(1, 12)))
def test_attempts_equal_the_runs_the_log_saw(runs_engine: sp.Engine, tmp_path_factory: pytest.TempPathFactory,
                                             actions: list[str], chunk: int | None) -> None:
    folder = tmp_path_factory.mktemp("runs")
    items = [(i, action, str(folder)) for i, action in enumerate(actions)]
    report = runs_engine.map(_tasks.logged, items, chunk_size=chunk or "auto")
    assert [o.index for o in report] == list(range(len(items)))
    assert [o.attempts for o in report] == runs_of(folder, len(items)), [o.kind for o in report]
    for o, action in zip(report, actions, strict=True):
        expected = {"ok": "ok", "error": "error", "crash": "crash", "hang": "timeout",
                    "crash_once": "ok" if runs_engine.config.retries else "crash"}[action]
        assert o.kind == expected, (o, action)


@pytest.mark.parametrize("crash_at", [None, 25])
def test_a_blind_plan_cut_by_its_budget_runs_each_item_once(tmp_path: Path,
                                                            crash_at: int | None) -> None:
    """A report of known length is planned at once, before any item's cost is known (issue 15:
    no round trip to learn that items are tiny). These items take 30 ms: each planned chunk is
    cut by its budget after an item or two, and its unstarted rest goes out again. Every item
    runs once (twice for those whose results died with a crashed worker), as the log says."""
    actions = ["crash" if i == crash_at else "slow" for i in range(40)]
    items = [(i, action, str(tmp_path)) for i, action in enumerate(actions)]
    with sp.Engine(workers=2, rerun_innocent=True) as eng:
        report = eng.map(_tasks.logged, items)
    assert [o.kind for o in report] == ["crash" if a == "crash" else "ok" for a in actions]
    assert [o.attempts for o in report] == runs_of(tmp_path, 40)
    assert sum(runs_of(tmp_path, 40)) <= 40 + (20 if crash_at is not None else 0)
    assert report.stats.chunks > 8  # the plan's chunks were cut and their rests resent


def test_a_chunk_sized_from_tiny_first_items_is_cut_when_later_items_are_slow() -> None:
    """imap sends single items until it learns their cost; tiny first items made the next chunk
    carry all the rest, and when the rest took 0.2 s each one worker ran them all while the
    other idled, and their outcomes came in one burst at the end (issue 15 attack). A chunk
    sized from a learnt tiny cost has a budget too: cut after a slow item, its rest is resent
    item by item, so both workers share the slow items and each runs once."""
    seconds = [0.0] * 4 + [0.2] * 8
    with sp.Engine(workers=2) as eng:
        outcomes = list(eng.imap(_tasks.pid_after_nap, seconds, ordered=False))
    assert sorted(o.index for o in outcomes) == list(range(len(seconds)))
    assert all(o.ok and o.attempts == 1 for o in outcomes), outcomes
    slow = [o for o in outcomes if seconds[o.index]]
    assert len({o.value for o in slow}) == 2, [(o.index, o.value) for o in slow]


def test_a_budgeted_chunk_stops_between_items_and_says_how_far_it_got() -> None:
    """In the worker: past its budget a chunk answers with the items it ran (a prefix), ended
    by the budget thread after the running item; tiny items run to the end."""
    slow = run_chunk(_tasks.sleep_for, [0.02] * 10, per_item_clock=False, budget=0.01)
    assert slow.values == [0.02] and slow.errors is None
    tiny = run_chunk(abs, list(range(-5000, 0)), per_item_clock=False, budget=5.0)
    assert tiny.values == list(range(5000, 0, -1))
    failing = run_chunk(_tasks.sleep_for, ["x", 0.02, 0.02, 0.02], per_item_clock=False,
                        budget=0.01)
    assert failing.errors is not None and list(failing.errors) == [0]
    assert failing.values == [None, 0.02]  # the budget runs across the error


def test_a_batch_waiting_for_room_to_resend_sleeps_instead_of_spinning() -> None:
    """Items due to go out again (a cut chunk's rest here; a crash's innocents, halves) that
    the in-flight window holds back can only go when an answer frees a place. The batch thread
    looked again at once, spinning a whole CPU away from the workers until then (200 items of
    20 ms on 2 workers: 2.95 s instead of 2.37 s on a loaded machine)."""
    with sp.Engine(workers=2) as eng:
        eng.map(_tasks.sleep_for, [0.001] * 4)  # workers up
        cpu, wall = time.thread_time(), time.perf_counter()
        report = eng.map(_tasks.sleep_for, [0.03] * 40)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    assert report.values == [0.03] * 40
    assert cpu < 0.25 * wall, (cpu, wall)
