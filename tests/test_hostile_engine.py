"""Hostile use, the engine side (issue 17): callbacks that raise, month-long timeouts, a pool
thread that fails, an exception or Ctrl-C leaving ``with Engine()``, shutdown under awaiting
calls. Real worker processes; every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, wait_until
from stagepool._backends import Cancelled, Group, Task

# ---- progress that fails (issue 17.3) ---------------------------------------------------------------


class FailsOnCall:
    """An ``on_progress`` callback that raises on its n-th call."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, progress: sp.Progress) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise ValueError(f"the callback broke on call {self.n}")


def logged(caplog: pytest.LogCaptureFixture, what: str) -> logging.LogRecord:
    (record,) = [r for r in caplog.records if r.name == "stagepool"]
    assert record.levelno == logging.WARNING and what in record.getMessage()
    assert "no result is lost" in record.getMessage()
    return record


# 200 one-item chunks: at least 40 progress updates (at most 5 chunks in flight per update).
ITEMS = 200


@pytest.mark.parametrize("call", ["map", "imap"])
def test_a_progress_callback_that_raises_costs_no_result(
        engine: sp.Engine, caplog: pytest.LogCaptureFixture, call: str) -> None:
    callback = FailsOnCall(20)
    run = engine.map if call == "map" else engine.imap
    outcomes = list(run(_tasks.double, range(ITEMS), chunk_size=1, on_progress=callback))
    assert sorted(o.index for o in outcomes) == list(range(ITEMS))
    assert all(o.ok and o.value == 2 * o.index for o in outcomes)
    assert callback.calls == 20  # not called again after it raised
    record = logged(caplog, "on_progress callback")
    assert record.exc_info is not None and record.exc_info[0] is ValueError  # the traceback


def test_a_progress_bar_on_a_broken_pipe_costs_no_result(
        engine: sp.Engine, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.close(read)  # as with `python job.py 2>&1 | head` once head has exited
    stream = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        report = engine.map(_tasks.double, range(ITEMS), chunk_size=1, progress=True)
    finally:
        with contextlib.suppress(BrokenPipeError):
            stream.close()
    assert report.values == [2 * i for i in range(ITEMS)]
    record = logged(caplog, "progress bar")
    assert record.exc_info is not None and record.exc_info[0] is BrokenPipeError


@pytest.mark.asyncio
async def test_an_async_progress_callback_that_raises_costs_no_result(
        engine: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    callback = FailsOnCall(3)
    report = await asyncio.wait_for(engine.map_async(
        _tasks.double, range(ITEMS), chunk_size=1, on_progress=callback), WAIT)
    assert report.values == [2 * i for i in range(ITEMS)]
    assert callback.calls == 3
    logged(caplog, "on_progress callback")


# ---- a month-long timeout (issue 17.4) -----------------------------------------------------------

MONTH = 30 * 86400.0  # past 2**31 ms, the most one poll() may wait


@pytest.mark.needs("hard_timeouts")
def test_a_month_long_timeout_works_for_map_and_submit(engine: sp.Engine) -> None:
    # The items run long enough for the pool thread to wait on their (month-away) deadline.
    report = engine.map(_tasks.sleep_for, [0.3] * 4, chunk_size=1, timeout=MONTH)
    assert [o.kind for o in report] == ["ok"] * 4
    with sp.Engine(workers=1, timeout=MONTH) as eng:
        assert eng.submit(_tasks.sleep_for, 0.3).result(timeout=WAIT) == 0.3
        assert eng.map(_tasks.sleep_for, [0.3, 0.3]).values == [0.3, 0.3]
        assert eng.submit(_tasks.double, 4).result(timeout=WAIT) == 8  # still serving
    assert engine.map(_tasks.double, range(5)).values == [0, 2, 4, 6, 8]


@pytest.mark.asyncio
async def test_submit_async_cancelled_by_shutdown_raises_task_cancelled() -> None:
    eng = sp.Engine(workers=1)
    try:
        busy = eng.submit(_tasks.sleep_for, 0.5)
        queued = asyncio.create_task(eng.submit_async(_tasks.double, 1))
        await asyncio.sleep(0.2)  # handed to the engine, queued behind the busy worker
        eng.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(sp.TaskCancelled, match="engine was shut down"):
            await asyncio.wait_for(queued, WAIT)
        assert not queued.cancelled()  # the task itself was not cancelled: it failed
        assert busy.result(timeout=WAIT) == 0.5
    finally:
        await asyncio.to_thread(eng.shutdown)


# ---- the pool thread: user code in it, and its own failure (issue 17.5) ---------------------------


def test_a_done_callback_that_exits_leaves_the_engine_serving(
        capfd: pytest.CaptureFixture[str]) -> None:
    ran_in: list[str] = []

    def leave(_: object) -> None:
        ran_in.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            sys.exit(3)  # in the pool thread: used to end it without a word

    with sp.Engine(workers=1) as eng:
        future = eng.submit(_tasks.sleep_for, 1.0)
        future.add_done_callback(leave)
        assert future.result(timeout=WAIT) == 1.0
        assert eng.submit(_tasks.double, 21).result(timeout=WAIT) == 42
        assert eng.map(_tasks.double, range(5)).values == [0, 2, 4, 6, 8]
    assert ran_in == ["stagepool-pool"]
    assert "completion callback raised" in capfd.readouterr().err


def test_a_start_hook_that_raises_fails_only_its_task() -> None:
    def refuse(task: Task) -> bool:
        raise RuntimeError("the start hook broke")

    with sp.Engine(workers=1) as eng:
        answers = raw_task(eng, _tasks.double, 1, on_start=refuse)
        assert wait_until(lambda: bool(answers), timeout=WAIT)
        (answer,) = answers
        assert isinstance(answer, Cancelled) and "the start hook broke" in answer.reason
        assert isinstance(answer.cause, RuntimeError)
        assert eng.map(_tasks.double, range(5)).values == [0, 2, 4, 6, 8]


def test_a_failing_pool_thread_closes_the_engine_loudly(
        capfd: pytest.CaptureFixture[str]) -> None:
    eng = sp.Engine(workers=2)
    try:
        pids = eng.worker_pids()
        running = eng.submit(_tasks.sleep_for, 1000)
        assert wait_until(running.running, timeout=WAIT)
        # A chunk whose timeouts tuple is malformed: its deadline cannot be computed, so the pool
        # thread raises (a stand-in for any bug in it).
        answers = raw_task(eng, _tasks.sleep_for, 0.5, timeouts=("soon",))
        error = running.exception(timeout=WAIT)  # answered, not left running forever
        assert isinstance(error, sp.TaskCancelled) and "pool thread failed" in str(error)
        assert isinstance(error.__cause__, TypeError)
        assert wait_until(lambda: bool(answers), timeout=WAIT)
        assert isinstance(answers[0], Cancelled) and isinstance(answers[0].cause, TypeError)
        with pytest.raises(sp.EngineClosed, match="pool thread failed") as info:
            eng.submit(_tasks.double, 1)
        assert isinstance(info.value.__cause__, TypeError)
        with pytest.raises(sp.EngineClosed, match="pool thread failed"):
            eng.map(_tasks.double, range(3))
        assert "the pool thread failed" in capfd.readouterr().err
        assert wait_until(lambda: not alive(pids), timeout=WAIT), alive(pids)
    finally:
        eng.shutdown()


def test_a_callable_timeout_on_submit_is_checked_and_never_runs_in_the_pool_thread() -> None:
    with sp.Engine(workers=1, timeout=lambda *args: "soon") as eng, \
            pytest.raises(TypeError, match="must be seconds"):
        eng.submit(_tasks.double, 1).result(timeout=WAIT)
    with sp.Engine(workers=1, timeout=lambda *args: None) as eng:  # None: no limit, as for map
        assert eng.submit(_tasks.double, 1).result(timeout=WAIT) == 2
    calls: list[str] = []

    def second_call_exits(*args: object) -> float:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the retry's
            raise SystemExit("the timeout function gave up")
        return 30.0

    with sp.Engine(workers=1, retries=1, retry_on="error", timeout=second_call_exits) as eng:
        future = eng.submit(_tasks.fail_on, (1, True))  # fails, so it is retried
        assert isinstance(future.exception(timeout=WAIT), SystemExit)
        assert eng.submit(_tasks.double, 4).result(timeout=WAIT) == 8
    assert "stagepool-pool" not in calls


def test_a_late_wake_up_never_writes_to_a_reused_descriptor() -> None:
    eng = sp.Engine(workers=1)
    backend = eng._backend
    eng.shutdown()
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.dup2(write, backend._mailbox.wake_w)  # type: ignore[union-attr]  # the number now means our pipe
    try:
        backend.withdraw(Group())  # type: ignore[union-attr]  # e.g. an imap finalized late
        with pytest.raises(BlockingIOError):
            os.read(read, 16)
    finally:
        for fd in (read, write, backend._mailbox.wake_w):  # type: ignore[union-attr]
            os.close(fd)


def raw_task(eng: sp.Engine, fn: Callable[[Any], Any], item: Any, **task_options: Any) -> list[Any]:
    """Queue a one-item task straight on the engine's backend; its answers land in the list."""
    backend = eng._backend
    assert backend is not None
    answers: list[Any] = []
    fn_key, fn_form = backend.codec.function(fn)
    payload = backend.codec.encode([item], None).payload
    backend.submit_many([Task(Group(), fn_key, fn_form, payload, 1,
                              lambda task, result: answers.append(result), **task_options)])
    return answers


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
