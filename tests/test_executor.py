"""The executor view and ``sp.ProcessPoolExecutor`` beyond the shared contract: the defects of
issue 16, each pinned by a test on real workers (the contract itself, run against the standard
library side by side, is ``test_executor_contract.py``)."""

from __future__ import annotations

import concurrent.futures
import gc
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT
from test_lifecycle import Script, script  # noqa: F401  # the fixture, used by name


@pytest.fixture
def no_gc() -> Iterator[None]:
    """References must go away by reference counting alone, as in the standard library."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def shutdown_within(engine: sp.Engine, seconds: float = WAIT) -> bool:
    """``engine.shutdown(wait=True)`` bounded: False (and the engine killed) if it hangs."""
    backend = engine._backend
    waiter = threading.Thread(target=engine.shutdown, daemon=True)
    waiter.start()
    waiter.join(seconds)
    if waiter.is_alive() and backend is not None:
        backend.shutdown(wait=True, cancel_pending=True, kill=True)
        return False
    return True


# ---- a worker retired by max_tasks_per_worker is replaced while work is queued ---------------

def test_max_tasks_one_then_shutdown_wait_runs_the_whole_queue() -> None:
    # It hung: a retired worker was replaced only while the pool was not stopping, so the queued
    # calls waited for workers that never came (CPython fixed the same bug in gh-115634).
    eng = sp.Engine(workers=3, max_tasks_per_worker=1)
    futures = [eng.submit(_tasks.pid_of, i) for i in range(6)]
    assert shutdown_within(eng), "shutdown(wait=True) hung with calls still queued"
    pids = [f.result(timeout=WAIT) for f in futures]
    assert len(set(pids)) == 6  # each call in a fresh worker


# ---- exceptions the standard library's handlers catch ----------------------------------------

def test_an_unpicklable_argument_is_a_pickling_error_caused_by_the_original(
        engine: sp.Engine) -> None:
    error = engine.submit(_tasks.identity, threading.Lock()).exception(timeout=WAIT)
    assert isinstance(error, sp.SerializationError) and isinstance(error, pickle.PicklingError)
    assert isinstance(error.__cause__, TypeError) and "lock" in str(error.__cause__)
    outcome = engine.map(_tasks.identity, [threading.Lock()])[0]
    assert isinstance(outcome.error, pickle.PicklingError)
    assert isinstance(outcome.error.__cause__, TypeError)


def test_an_argument_that_fails_to_unpickle_in_the_worker_is_one_serialization_error(
        engine: sp.Engine) -> None:
    via_submit = engine.submit(_tasks.identity, _tasks.BreaksInWorker(1)).exception(timeout=WAIT)
    via_map = engine.map(_tasks.identity, [_tasks.BreaksInWorker(1)])[0]
    assert via_map.kind == "serialization"
    for error in (via_submit, via_map.error):
        assert isinstance(error, sp.SerializationError), repr(error)
        assert "cannot be rebuilt in a worker" in str(error)
        assert "cannot be rebuilt in a worker" in str(error.__cause__)  # the worker's traceback


def test_a_dead_worker_is_a_broken_process_pool_yet_the_engine_serves(engine: sp.Engine) -> None:
    error = engine.submit(_tasks.hard_exit, 0).exception(timeout=WAIT)
    assert isinstance(error, sp.WorkerCrashed) and isinstance(error, BrokenProcessPool)
    assert engine.submit(_tasks.double, 21).result(timeout=WAIT) == 42


# ---- the cancellation race: idle workers take work as soon as it is submitted -------------------

def test_shutdown_cancel_futures_right_after_submits_lets_idle_workers_start() -> None:
    eng = sp.Engine(workers=2)
    futures = [eng.executor.submit(_tasks.double, i) for i in range(50)]
    eng.executor.shutdown(wait=True, cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert len(ran) >= 2, "every call was cancelled, though two workers were idle"
    assert all(f.result(timeout=WAIT) == 2 * futures.index(f) for f in ran)
    assert all(f.done() for f in futures)


# ---- tracebacks of callables pickled by value ---------------------------------------------------

def _closure_raising() -> Callable[[int], int]:
    limit = 3

    def check(x: int) -> int:
        raise ValueError(f"{x} is over {limit}")  # the line a traceback must show

    return check


@pytest.mark.parametrize("fn", [_tasks.Parser.parse, _closure_raising()],
                         ids=["classmethod", "closure"])
def test_by_value_callables_keep_their_file_and_line_in_tracebacks(
        engine: sp.Engine, fn: Callable[[str], int]) -> None:
    error = engine.submit(fn, "x").exception(timeout=WAIT)
    assert isinstance(error, ValueError)
    remote = str(error.__cause__)
    assert "<dynamic-code>" not in remote, remote
    assert ".py" in remote and "# the line a traceback must show" in remote, remote


