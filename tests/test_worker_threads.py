"""``stagepool.worker_threads()`` (issue 18, point 7): the thread budget a task passes on to
libraries that size their own pools (PyAV, OpenCV, torch), without importing anything heavy."""

from __future__ import annotations

import pytest

import _tasks
import stagepool as sp
from stagepool._resources import ResourceSnapshot

WAIT = 60.0


def test_outside_a_worker_it_is_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGEPOOL_WORKER_THREADS", raising=False)
    assert sp.worker_threads() == ResourceSnapshot.read().usable_cpus
    monkeypatch.setenv("STAGEPOOL_WORKER_THREADS", "zero")  # malformed: counts as unset
    assert sp.worker_threads() == ResourceSnapshot.read().usable_cpus


@pytest.mark.parametrize("workers", [1, 2])
def test_in_a_worker_it_is_its_share_and_imports_nothing_heavy(
        workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_NUM_THREADS", "STAGEPOOL_WORKER_THREADS"):
        monkeypatch.delenv(name, raising=False)
    share = max(1, sp.plan_workers().cpus // workers)
    heavy = ("numpy", "psutil", "stagepool._resources")
    with sp.Engine(workers=workers) as engine:
        before = engine.map(_tasks.loaded_modules, [heavy] * workers, chunk_size=1, timeout=WAIT)
        calls = [engine.submit(sp.worker_threads) for _ in range(2 * workers)]
        assert [call.result(timeout=WAIT) for call in calls] == [share] * (2 * workers)
        after = engine.map(_tasks.loaded_modules, [heavy] * workers, chunk_size=1, timeout=WAIT)
    assert "numpy" not in before.values[0]  # (loky itself may load psutil in a worker)
    assert after.values == before.values  # worker_threads() imported none of them


def test_the_users_openmp_choice_is_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with sp.Engine(workers=2) as engine:
        assert engine.submit(sp.worker_threads).result(timeout=WAIT) == 3


def test_the_serial_backend_runs_tasks_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGEPOOL_WORKER_THREADS", raising=False)
    with sp.Engine(backend="serial") as engine:
        assert engine.submit(sp.worker_threads).result(timeout=WAIT) == sp.worker_threads()
