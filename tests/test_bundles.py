"""Short single calls travel to a worker in bundles (``_bundle.py``,
``_backends/_local/_bundling.py``), and each still gets its own true outcome: its value, its
exception, or the crash or timeout it caused alone; the others of its bundle are unaffected."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import _bundle_tasks as bt
import stagepool as sp
from conftest import WAIT
from stagepool._bundle import CallBundler

N = 60


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every bundle merged from now on."""
    sizes: list[int] = []
    merge = CallBundler.merge

    def counting(self: CallBundler, tasks: list[Any]) -> Any:
        sizes.append(len(tasks))
        return merge(self, tasks)

    monkeypatch.setattr(CallBundler, "merge", counting)
    yield sizes


# Calls run before the test's own, so that the learnt duration (a moving average that starts at
# the first, cold call) is short: with 3, one cold call of 20 ms on a loaded machine kept it past
# the bundling bound and no bundle formed.
WARM_CALLS = 10


def queued_behind_a_busy_worker(engine: sp.Engine, fn: Callable[[int], int]) -> list[cf.Future[int]]:
    """``N`` calls of ``fn`` queued while the only worker sleeps, once ``fn``'s duration is known
    (calls of unknown length never travel together)."""
    for x in range(WARM_CALLS):
        assert engine.submit(fn, x).result(timeout=WAIT) == 2 * x
    busy = engine.submit(bt.sleep_for, 0.5)
    futures = [engine.submit(fn, x) for x in range(N)]
    assert busy.result(timeout=WAIT) == 0.5
    return futures


def only_the_bad_call_fails(futures: list[cf.Future[int]], error: type[BaseException],
                            match: str | None = None) -> None:
    """Call ``BAD`` raised ``error``; every other call returned its own value."""
    for x, future in enumerate(futures):
        if x == bt.BAD:
            with pytest.raises(error, match=match):
                future.result(timeout=WAIT)
        else:
            assert future.result(timeout=WAIT) == 2 * x


def test_each_call_of_a_bundle_gets_its_own_value_or_exception(merges: list[int]) -> None:
    with sp.Engine(workers=1) as engine:
        futures = queued_behind_a_busy_worker(engine, bt.raise_on_bad)
        only_the_bad_call_fails(futures, ValueError, match="bad 13")
    assert merges and max(merges) > 1


def test_a_crash_in_a_bundle_fails_only_its_own_call(merges: list[int]) -> None:
    with sp.Engine(workers=1) as engine:
        futures = queued_behind_a_busy_worker(engine, bt.crash_on_bad)
        only_the_bad_call_fails(futures, sp.WorkerCrashed, match="exited with code 3")
        assert engine.submit(bt.crash_on_bad, 1).result(timeout=WAIT) == 2
    assert merges and max(merges) > 1


def test_calls_that_must_run_at_most_once_never_travel_together(
        merges: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rerun_innocent=False``: a bundle's finished calls whose answer died with the worker
    would run again, so calls travel alone and each runs at most once (the crashing one too)."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("BUNDLE_RUNS", str(runs))
    with sp.Engine(workers=1, rerun_innocent=False) as engine:
        futures = queued_behind_a_busy_worker(engine, bt.note_then_crash_on_bad)
        only_the_bad_call_fails(futures, sp.WorkerCrashed)
    counts = [int(line) for line in runs.read_text().split()]
    assert sorted(counts) == sorted([*range(WARM_CALLS), *range(N)]), "a call ran twice or not at all"
    assert merges == []


def test_a_timeout_in_a_bundle_fails_only_its_own_call(merges: list[int]) -> None:
    with sp.Engine(workers=1, timeout=2.0) as engine:
        futures = queued_behind_a_busy_worker(engine, bt.hang_on_bad)
        only_the_bad_call_fails(futures, sp.TaskTimeout, match="timeout of 2 s")
    assert merges and max(merges) > 1


def test_calls_cancelled_while_queued_never_run_and_the_rest_run_once(
        tmp_path: Path, merges: list[int]) -> None:
    log = tmp_path / "runs"
    with sp.Engine(workers=1) as engine:
        for x in range(WARM_CALLS):
            engine.submit(bt.note_run, str(tmp_path / "warm"), x).result(timeout=WAIT)
        busy = engine.submit(bt.sleep_for, 0.5)
        futures = [engine.submit(bt.note_run, str(log), x) for x in range(N)]
        cancelled = {x for x, f in enumerate(futures) if x % 3 == 0 and f.cancel()}
        assert busy.result(timeout=WAIT) == 0.5
        for x, future in enumerate(futures):
            if x in cancelled:
                assert future.cancelled()
            else:
                assert future.result(timeout=WAIT) == 2 * x
    runs = sorted(int(line) for line in log.read_text().split())
    assert runs == sorted(set(range(N)) - cancelled)  # each call once, the cancelled never
    assert len(cancelled) == N // 3 and merges and max(merges) > 1


def test_a_worker_recycled_after_each_call_runs_one_call_each(merges: list[int]) -> None:
    with sp.Engine(workers=1, max_tasks_per_worker=1) as engine:
        for x in range(3):
            engine.submit(bt.pid_of, x).result(timeout=WAIT)
        busy = engine.submit(bt.sleep_for, 0.3)
        pids = [engine.submit(bt.pid_of, x) for x in range(10)]
        busy.result(timeout=WAIT)
        assert len({f.result(timeout=WAIT) for f in pids}) == 10  # a fresh worker per call
    assert not merges
