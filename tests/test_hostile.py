"""Items that attack their own worker: they fork, start processes and die, close its standard fds,
or the initializer kills it. Each must cost at most its own outcome, never the engine."""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import time
from pathlib import Path

import psutil
import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, wait_until
from test_lifecycle import alive


def gone(pid: int) -> bool:
    return not alive([pid])


def live_children(pids: list[int]) -> list[int]:
    """Descendants of ``pids`` still running (zombies waiting for their parent do not count)."""
    out = []
    for pid in pids:
        try:
            out += alive([c.pid for c in psutil.Process(pid).children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    return out


# ---- forks ------------------------------------------------------------------------------------


def test_a_child_forked_by_an_item_never_answers_for_its_worker() -> None:
    eng = sp.Engine(workers=2)
    try:
        report = eng.map(_tasks.fork_then_return, range(100))
        assert [o.kind for o in report] == ["ok"] * 100, report.failed
        assert report.values == [10 * i for i in range(100)]
        assert wait_until(lambda: not live_children(eng.worker_pids()), timeout=10)
        assert eng.map(_tasks.double, range(10)).values == [2 * i for i in range(10)]
        pids = eng.worker_pids()
    finally:
        started = time.monotonic()
        eng.shutdown(kill=True)
    assert time.monotonic() - started < 5
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10)


@pytest.mark.parametrize("per_item_clock", [False, True])
def test_a_forked_child_runs_no_later_item_of_its_chunk(tmp_path: Path,
                                                       per_item_clock: bool) -> None:
    """The child of a forking item leaves after that item: it runs none of the chunk's next
    ones. The worker's loop tests nothing per item: the at-fork hook empties the child's items.
    Both loops: clocked items and tiny ones."""
    path = tmp_path / "notes"
    items = [(x, 3, str(path)) for x in range(50)]
    with concurrent.futures.ProcessPoolExecutor(1, mp.get_context("spawn")) as pool:
        values = pool.submit(_tasks.run_chunk_guarded, items, per_item_clock).result(WAIT)
    assert values == list(range(50))
    # The child writes its note on its own time (on a loaded machine, after the worker answered).
    assert wait_until(lambda: path.exists() and path.read_text().endswith("\n"), timeout=10)
    time.sleep(0.2)  # had it gone on, its next notes would follow at once
    assert path.read_text().split() == ["3"]  # the child ran item 3, then left


@pytest.mark.parametrize(("how", "exit_code"), [("return", 0), ("raise", 1), ("exit", None)])
@pytest.mark.needs("processes")  # in-process, the fork would copy the caller (here: pytest)
def test_a_forked_child_exits_with_the_status_its_code_gives(engine: sp.Engine, how: str,
                                                            exit_code: int | None) -> None:
    report = engine.map(_tasks.fork_and_wait, [(x, how) for x in range(12)])
    assert report.ok, report.failed
    expected = [(10 * x, x % 7 if exit_code is None else exit_code) for x in range(12)]
    assert report.values == expected
    assert wait_until(lambda: not live_children(engine.worker_pids()), timeout=10)


def test_a_fork_in_the_initializer_does_not_make_a_second_worker() -> None:
    with sp.Engine(workers=1, initializer=_tasks.init_fork) as eng:
        assert eng.map(_tasks.pid_of, range(20), chunk_size=1).values == [eng.worker_pids()[0]] * 20
        assert wait_until(lambda: not live_children(eng.worker_pids()), timeout=10)


# ---- processes an item started ------------------------------------------------------------------

ENDINGS = {  # how the worker ends: (what the item does, engine options, the item's outcome)
    "crash": ("crash", {}, "crash"),
    "timeout": ("hang", {"timeout": 1.5}, "timeout"),
    "recycled": ("return", {"max_tasks_per_worker": 1}, "ok"),
    "shutdown": ("return", {}, "ok"),
}


@pytest.mark.parametrize("how", ["direct", "orphan"])
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_what_an_item_started_dies_with_its_worker(tmp_path: Path, ending: str, how: str) -> None:
    # "orphan": started through a shell that exits at once, so no process tree leads to it.
    then, options, kind = ENDINGS[ending]
    pid_file = tmp_path / "sleep.pid"
    try:
        with sp.Engine(workers=1, **options) as eng:
            report = eng.map(_tasks.start_sleeper, [(how, then, str(pid_file))])
            assert report[0].kind == kind, report[0]
            sleeper = int(pid_file.read_text())
            if ending != "shutdown":
                assert wait_until(lambda: gone(sleeper), timeout=10)
                assert eng.map(_tasks.double, [4]).values == [8]  # and the engine still serves
        assert wait_until(lambda: gone(sleeper), timeout=10)
    finally:
        if pid_file.exists() and not gone(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()


# ---- standard fds -------------------------------------------------------------------------------


def test_an_item_that_closes_the_standard_fds_does_not_poison_its_worker(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    with sp.Engine(workers=1) as eng:  # started here: its worker's stdout is captured
        assert eng.map(_tasks.close_std_fds, [1]).values == [1]
        report = eng.map(_tasks.say_hello, [2, 3], chunk_size=1)
        assert report.ok, report.failed
        pid = eng.worker_pids()[0]
        assert eng.map(_tasks.pid_of, [0]).values == [pid]  # the same worker all along
    out, _err = capfd.readouterr()
    assert "item 2 says hello" in out and "item 3 says hello" in out
    # stderr reaches the parent as log records of "stagepool.worker" (test_worker_logs.py)
    assert any("item 3 to stderr" in r.getMessage() for r in caplog.records)


# ---- initializers that kill their worker -----------------------------------------------------------


@pytest.mark.parametrize(("how", "words"), [
    ("exit", ("exited with code 3",)),
    ("segfault", ("SIGSEGV", "Fatal Python error: Segmentation fault")),
])
def test_an_initializer_that_kills_its_worker_is_named(tmp_path: Path, how: str,
                                                      words: tuple[str, ...]) -> None:
    log = tmp_path / "init.log"
    with sp.Engine(workers=2, initializer=_tasks.init_crash, initargs=(how, str(log))) as eng:
        report = eng.map(_tasks.double, range(6))
        assert [o.kind for o in report] == ["crash"] * 6
        message = str(report[3].error)
        for word in ("while running the initializer _tasks.init_crash", "fix the initializer",
                     "loading the model from /models/big.onnx", *words):
            assert word in message, (word, message)
        assert eng.map(_tasks.double, [1])[0].kind == "crash"  # answered at once, no new worker
        with pytest.raises(sp.WorkerCrashed, match="initializer"):
            eng.submit(_tasks.double, 1).result(timeout=WAIT)
    assert len(log.read_text().split()) == 2  # one run per worker: no respawn loop


# ---- an initializer that hangs (17.7) ---------------------------------------------------------------


def test_a_hung_initializer_fails_every_item_naming_the_hang() -> None:
    """It blocked map forever: ``timeout=`` covers items only."""
    started = time.monotonic()
    with sp.Engine(workers=1, initializer=_tasks.sleep_for, initargs=(3600,),
                   init_timeout=1.0) as eng:
        report = eng.map(_tasks.double, range(3))
        assert [o.kind for o in report] == ["error"] * 3
        assert all(isinstance(o.error, sp.InitializerError) for o in report)
        assert "_tasks.sleep_for ran longer than init_timeout" in str(report[0].error)
        assert all(o.attempts == 0 for o in report)  # no item ran
        with pytest.raises(sp.InitializerError):  # later calls fail the same way, at once
            eng.submit(_tasks.double, 1).result(timeout=WAIT)
    assert time.monotonic() - started < WAIT


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError),
                                               (float("nan"), ValueError), ("10", TypeError)])
def test_init_timeout_is_checked_at_the_door(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="init_timeout"):
        sp.Engine(init_timeout=value)  # type: ignore[arg-type]
