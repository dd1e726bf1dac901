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


