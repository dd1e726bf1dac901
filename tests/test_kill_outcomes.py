"""``shutdown(kill=True)`` in the middle of a chunk: every item's outcome says what truly
happened to it, and ``attempts`` equals its real runs (one side-effect line per run).

One worker, chunks of 4: items 0 and 1 finish, item 2 hangs; the kill comes once item 2 has
started. Items 0-1 ran (results lost with the worker), item 2 was running, 3-7 never started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, wait_until

HANG = 600.0  # item 2 sleeps this long: only the kill ends it


def _work(folder: Path) -> list[tuple[int, float, str]]:
    return [(i, HANG if i == 2 else 0.0, str(folder)) for i in range(8)]


def _runs(folder: Path, index: int) -> int:
    path = folder / str(index)
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when_running(eng: sp.Engine, folder: Path) -> threading.Thread:
    """Shut ``eng`` down with kill=True once item 2 has started (in a thread, as a caller's
    other thread would)."""
    return _kill_when_running_item(eng, folder, 2)


def _kill_when_running_item(eng: sp.Engine, folder: Path, index: int) -> threading.Thread:
    def kill() -> None:
        wait_until(lambda: _runs(folder, index) > 0)
        eng.shutdown(kill=True)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _check(outcomes: list[sp.Outcome[Any]], folder: Path) -> None:
    by_index = {o.index: o for o in outcomes}
    assert sorted(by_index) == list(range(8))
    for index, outcome in by_index.items():
        assert outcome.attempts == _runs(folder, index), (index, outcome.attempts, outcome.error)
    assert [by_index[i].kind for i in (0, 1)] == ["cancelled"] * 2  # ran, results lost
    for i in (0, 1):
        message = str(by_index[i].error)
        assert "ran, but its result was lost" in message and "shutdown(kill=True)" in message
    running = str(by_index[2].error)
    assert by_index[2].kind == "cancelled" and by_index[2].attempts == 1
    assert "was running when the engine was shut down with shutdown(kill=True)" in running
    for i in range(3, 8):
        assert by_index[i].kind == "cancelled" and by_index[i].attempts == 0
        assert "cancelled before it ran" in str(by_index[i].error)


def _map(eng: sp.Engine, work: list[Any]) -> list[sp.Outcome[Any]]:
    return list(eng.map(_tasks.note_runs_then_sleep, work, chunk_size=4))


def _imap(eng: sp.Engine, work: list[Any]) -> list[sp.Outcome[Any]]:
    return list(eng.imap(_tasks.note_runs_then_sleep, work, chunk_size=4))


def _amap(eng: sp.Engine, work: list[Any]) -> list[sp.Outcome[Any]]:
    async def run() -> list[sp.Outcome[Any]]:
        report = await asyncio.wait_for(
            eng.map_async(_tasks.note_runs_then_sleep, work, chunk_size=4), WAIT)
        return list(report)
    return asyncio.run(run())


def _aimap(eng: sp.Engine, work: list[Any]) -> list[sp.Outcome[Any]]:
    async def run() -> list[sp.Outcome[Any]]:
        stream = eng.imap_async(_tasks.note_runs_then_sleep, work, chunk_size=4)
        return [o async for o in stream]
    return asyncio.run(asyncio.wait_for(run(), WAIT))


@pytest.mark.parametrize("call", [_map, _imap, _amap, _aimap], ids=lambda f: f.__name__[1:])
def test_kill_mid_chunk_gives_true_outcomes(
        tmp_path: Path, call: Callable[[sp.Engine, list[Any]], list[sp.Outcome[Any]]]) -> None:
    _kill_and_check(sp.Engine(workers=1), call, tmp_path)


def test_kill_mid_chunk_gives_true_outcomes_on_dask(tmp_path: Path) -> None:
    """The engine's kill reaches a dask worker's lanes as a cancel: the client answers each
    chunk from what that worker recorded as it killed them."""
    pytest.importorskip("distributed")
    _kill_and_check(sp.Engine(backend="dask", workers=1), _map, tmp_path)


def _kill_and_check(eng: sp.Engine, call: Callable[[sp.Engine, list[Any]], list[sp.Outcome[Any]]],
                    tmp_path: Path) -> None:
    try:
        killer = _kill_when_running(eng, tmp_path)
        outcomes = call(eng, _work(tmp_path))
        killer.join(WAIT)
    finally:
        eng.shutdown(kill=True)
    _check(outcomes, tmp_path)


@pytest.mark.parametrize("view", ["submit", "executor"])
def test_kill_running_call_says_shutdown(tmp_path: Path, view: str) -> None:
    eng = sp.Engine(workers=1)
    try:
        submit = eng.submit if view == "submit" else eng.executor.submit
        done = submit(_tasks.note_runs_then_sleep, (0, 0.0, str(tmp_path)))
        assert done.result(WAIT) == 0
        running = submit(_tasks.note_runs_then_sleep, (2, HANG, str(tmp_path)))
        queued = submit(_tasks.note_runs_then_sleep, (3, 0.0, str(tmp_path)))
        killer = _kill_when_running(eng, tmp_path)
        error = running.exception(WAIT)
        killer.join(WAIT)
    finally:
        eng.shutdown(kill=True)
    assert isinstance(error, sp.TaskCancelled), error
    assert "was running when the engine was shut down with shutdown(kill=True)" in str(error)
    assert _runs(tmp_path, 2) == 1 and _runs(tmp_path, 3) == 0
    assert queued.cancelled() or isinstance(queued.exception(WAIT), sp.TaskCancelled)
    with pytest.raises((concurrent.futures.CancelledError, sp.TaskCancelled)):
        queued.result(WAIT)


def test_kill_in_a_bundle_of_calls_gives_true_answers(tmp_path: Path) -> None:
    """Short calls travel to a worker together (``_bundling``): a kill in the middle of a bundle
    tells the calls that finished that their result was lost, the running one that it was
    killed, and the rest that they never started."""
    warm, folder = tmp_path / "warm", tmp_path / "runs"
    warm.mkdir()
    folder.mkdir()
    eng = sp.Engine(workers=1)
    try:
        for future in [eng.submit(_tasks.note_runs_then_sleep, (i, 0.0, str(warm)))
                       for i in range(60)]:  # learn that these calls are short: they bundle
            future.result(WAIT)
        futures = [eng.submit(_tasks.note_runs_then_sleep, (i, HANG if i == 5 else 0.0,
                                                            str(folder))) for i in range(20)]
        killer = _kill_when_running_item(eng, folder, 5)
        concurrent.futures.wait(futures, WAIT)
        killer.join(WAIT)
    finally:
        eng.shutdown(kill=True)
    for i, future in enumerate(futures):
        runs = _runs(folder, i)
        error = None if future.cancelled() else future.exception(WAIT)
        if runs == 0:
            assert error is None or not any(  # a call that never ran says nothing else
                claim in str(error) for claim in ("was running", "ran, but")), (i, error)
        elif error is not None:
            assert isinstance(error, sp.TaskCancelled), (i, error)
            assert ("ran, but its result was lost when the engine was shut down" in str(error)
                    or "was running when the engine was shut down" in str(error)), (i, error)
        assert runs <= 1
    assert "was running when" in str(futures[5].exception(WAIT))


def test_kill_of_running_short_chunks_on_dask_counts_every_run(tmp_path: Path) -> None:
    """Items of 30 ms in chunks of 4 on two dask workers, killed while chunks run, end and
    start: every item's ``attempts`` is its real runs. A chunk running behind one that had
    ended (its answer still on the way) was taken for a queued one and answered "cancelled
    before it ran", and items a lane started between the cancel and its death were too."""
    pytest.importorskip("distributed")
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        work = [(i, 0.03, str(folder)) for i in range(64)]
        eng = sp.Engine(backend="dask", workers=2)
        try:
            killer = _kill_when_running_item(eng, folder, 9)
            outcomes = list(eng.map(_tasks.note_runs_then_sleep, work, chunk_size=4))
            killer.join(WAIT)
        finally:
            eng.shutdown(kill=True)
        assert sorted(o.index for o in outcomes) == list(range(64))
        # The item a lane was on when killed counts its run even if the kill landed before
        # its first line (after the worker named it): one more, never one less.
        wrong = [(o.index, o.attempts, _runs(folder, o.index), str(o.error)) for o in outcomes
                 if not 0 <= o.attempts - _runs(folder, o.index)
                 <= ("was running when" in str(o.error))]
        assert not wrong, wrong


def test_a_kill_under_a_generator_reads_no_more_of_it(tmp_path: Path) -> None:
    """A map over a generator, killed mid-way: the report holds one outcome for each item read
    from the generator (each with its true runs), and nothing more is read from it (it may be
    endless); the rest stays in the generator (README's promise for iterators)."""
    read: list[int] = []

    def items() -> Any:
        for i in range(10_000):
            read.append(i)
            yield (i, 0.01, str(tmp_path))

    eng = sp.Engine(workers=2)
    try:
        killer = _kill_when_running_item(eng, tmp_path, 40)
        report = eng.map(_tasks.note_runs_then_sleep, items())
        killer.join(WAIT)
        taken = len(read)
        assert 40 < taken < 10_000
        assert [o.index for o in report] == list(range(taken))
        assert {o.kind for o in report} <= {"ok", "cancelled"}
        for outcome in report:
            assert outcome.attempts == _runs(tmp_path, outcome.index), outcome
        with pytest.raises(sp.EngineClosed):
            eng.map(_tasks.double, [1])
        assert len(read) == taken  # nothing read after the kill
    finally:
        eng.shutdown(kill=True)
