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
# The pytest process's pid, inherited by every worker. setdefault: a worker that imports a test
# module (to unpickle a function defined there) imports this file too, and must not claim to be
# the parent (it then unpickled _tasks.BreaksInWorker, failing the next test that sends one).
os.environ.setdefault("STAGEPOOL_TEST_PARENT", str(os.getpid()))

import stagepool as sp

WAIT = 30.0  # the bound on any single wait in a test


def stagepool_workers() -> set[int]:
    """Pids of this process's stagepool worker processes (alive, not zombies)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if (child.status() != psutil.STATUS_ZOMBIE and "stagepool-worker" in " ".join(
                child.cmdline()
            )) or _is_loky_worker(child) or _is_template_child(child):
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


def _is_template_child(proc: psutil.Process) -> bool:
    """A worker forked by the warm template (whose command line both of them carry)."""
    try:
        parent = proc.parent()
        return (parent is not None and proc.status() != psutil.STATUS_ZOMBIE
                and all("stagepool._template" in " ".join(p.cmdline()) for p in (proc, parent)))
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


BACKENDS = ("local", "serial", "dask")


@pytest.fixture(scope="session")
def local_engine(request: pytest.FixtureRequest) -> Iterator[sp.Engine]:
    """A shared 2-worker engine: tests that break workers must leave it serving (they check)."""
    with sp.Engine(workers=2) as eng:
        request.session.__dict__["_stagepool_engine"] = eng  # its workers are no leftovers
        yield eng


@pytest.fixture(scope="session")
def serial_engine() -> Iterator[sp.Engine]:
    with sp.Engine(backend="serial") as eng:
        yield eng


@pytest.fixture(scope="session")
def dask_engine(request: pytest.FixtureRequest) -> Iterator[sp.Engine]:
    """An in-process LocalCluster(processes=True) of 2 one-thread workers, each hosting its
    lanes (skipped where dask.distributed is not installed)."""
    pytest.importorskip("distributed")
    with sp.Engine(backend="dask", workers=2) as eng:
        request.session.__dict__["_stagepool_dask_engine"] = eng  # its lanes are no leftovers
        yield eng


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> sp.Engine:
    """The shared engine of each backend: one suite, every backend.

    A test that needs what not every backend can do says so with ``@pytest.mark.needs(...)``,
    naming fields of :class:`stagepool._backends.Capabilities` (``survives_crash``,
    ``hard_timeouts``, ``processes``, ...); it is skipped, by that declared capability, on a
    backend that does not have them."""
    eng: sp.Engine = request.getfixturevalue(f"{request.param}_engine")
    needed = [name for mark in request.node.iter_markers("needs") for name in mark.args]
    missing = [name for name in needed if not getattr(eng.capabilities, name)]
    if missing:
        pytest.skip(f"the {request.param} backend does not declare {', '.join(missing)}")
    return eng


@pytest.fixture(autouse=True, scope="module")
def no_leftover_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test module, only the session engine's workers may remain."""
    yield
    allowed: set[int] = set()
    for name in ("_stagepool_engine", "_stagepool_dask_engine"):
        session_engine = request.session.__dict__.get(name)
        if session_engine is not None:
            allowed.update(session_engine.worker_pids())
            spare = getattr(session_engine._backend, "spare_pid", None)  # the local backend's
            if spare is not None and spare() is not None:
                allowed.add(spare())

    def clean() -> bool:
        return stagepool_workers() <= allowed

    if not wait_until(clean, timeout=10):
        leftovers = stagepool_workers() - allowed
        pytest.fail(f"worker processes left behind after {request.module.__name__}: {leftovers}")


def shm_entries() -> set[str]:
    try:
        # Ours only: other processes on the machine create "sem.mp-*" and "sem.loky-<pid>-*"
        # semaphores and their own segments at any time.
        me = os.getpid()
        return {name for name in os.listdir("/dev/shm")
                if name.startswith((f"stagepool-{me}-", f"sem.loky-{me}-"))}
    except FileNotFoundError:
        return set()
