"""Shared fixtures: one real engine per session, and a guard against leftover worker processes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so workers and tests import _tasks alike
os.environ["STAGEPOOL_TEST_PARENT"] = str(os.getpid())

import stagepool as sp

WAIT = 30.0  # the bound on any single wait in a test


def stagepool_workers() -> set[int]:
    """Pids of this process's stagepool worker processes (alive, not zombies)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if (child.status() != psutil.STATUS_ZOMBIE and "stagepool-worker" in " ".join(
                child.cmdline()
            )) or _is_loky_worker(child):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def _is_loky_worker(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
        return "popen_loky_posix" in cmd and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(scope="session")
def engine() -> Iterator[sp.Engine]:
    """A shared 2-worker engine: tests that break workers must leave it serving (they check)."""
    with sp.Engine(workers=2) as eng:
        yield eng


@pytest.fixture(autouse=True, scope="module")
def no_leftover_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test module, only the session engine's workers may remain."""
    yield
    session_engine = request.session.__dict__.get("_stagepool_engine")
    allowed = set(session_engine.worker_pids()) if session_engine is not None else set()

    def clean() -> bool:
        return stagepool_workers() <= allowed

    if not wait_until(clean, timeout=10):
        leftovers = stagepool_workers() - allowed
        pytest.fail(f"worker processes left behind after {request.module.__name__}: {leftovers}")


@pytest.fixture(autouse=True)
def _remember_engine(request: pytest.FixtureRequest) -> None:
    if "engine" in request.fixturenames:
        request.session.__dict__["_stagepool_engine"] = request.getfixturevalue("engine")


def shm_entries() -> set[str]:
    try:
        # Ours only: other processes on the machine create "sem.mp-*" and "sem.loky-<pid>-*"
        # semaphores and their own segments at any time.
        me = os.getpid()
        return {name for name in os.listdir("/dev/shm")
                if name.startswith((f"stagepool-{me}-", f"sem.loky-{me}-"))}
    except FileNotFoundError:
        return set()
