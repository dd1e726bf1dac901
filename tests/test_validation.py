"""Hostile use of the configuration: every bad argument is refused at the door, naming itself.

Engines here are real (their workers start); a constructor that raises starts none.
"""

from __future__ import annotations

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, stagepool_workers, wait_until

# --------------------------------------------------------------------------------------------------
# STAGEPOOL_MAX_WORKERS: a maximum, never a raise
# --------------------------------------------------------------------------------------------------


def test_env_max_workers_never_raises_an_explicit_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEPOOL_MAX_WORKERS", "8")
    with sp.Engine(workers=1) as engine:
        assert engine.workers == 1
        assert engine.map(_tasks.double, range(4), timeout=WAIT).values == [0, 2, 4, 6]
        assert len(engine.worker_pids()) == 1


def test_env_max_workers_caps_an_explicit_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEPOOL_MAX_WORKERS", "1")
    with sp.Engine(workers=2) as engine:
        assert engine.workers == 1
        assert "capped by STAGEPOOL_MAX_WORKERS=1" in repr(engine)


def test_a_huge_env_max_workers_is_only_a_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGEPOOL_MAX_WORKERS", raising=False)
    planned = sp.plan_workers().workers
    monkeypatch.setenv("STAGEPOOL_MAX_WORKERS", "99999")
    assert sp.plan_workers().workers == planned


@pytest.mark.parametrize("raw", ["0", "-1", "abc"])
def test_invalid_env_max_workers_fails_the_constructor(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("STAGEPOOL_MAX_WORKERS", raw)
    before = stagepool_workers()
    with pytest.raises(ValueError, match=f"STAGEPOOL_MAX_WORKERS must be an integer >= 1, got '{raw}'"):
        sp.Engine(workers=1)
    assert wait_until(lambda: stagepool_workers() <= before, timeout=5)


def test_repr_says_how_the_count_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGEPOOL_MAX_WORKERS", raising=False)
    plan = sp.plan_workers()
    with sp.Engine(workers=1) as engine:
        assert repr(engine) == (
            f"<stagepool.Engine 1 worker (explicit; the machine plan allows {plan.workers}: "
            f"{plan.detail})>"
        )
    assert repr(engine).endswith(", closed>")
    with sp.Engine() as engine:
        noun = "worker" if plan.workers == 1 else "workers"
        assert repr(engine) == f"<stagepool.Engine {plan.workers} {noun} (auto: {plan.detail})>"
        assert "workers: " not in repr(engine)


# --------------------------------------------------------------------------------------------------
# Seconds: backoff and timeout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "error", "match"),
    [
        (float("nan"), ValueError, "backoff must be a finite number of seconds, got nan"),
        (float("inf"), ValueError, "backoff must be a finite number of seconds, got inf"),
        (-0.5, ValueError, "backoff must be >= 0 seconds, got -0.5"),
        (10**400, ValueError, "backoff must be a finite number of seconds"),
        (True, TypeError, "backoff must be a number of seconds"),
        ("1s", TypeError, "backoff must be a number of seconds"),
    ],
)
def test_bad_backoff_is_refused(backoff: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(workers=1, retries=1, backoff=backoff)  # type: ignore[arg-type]


def test_backoff_whose_last_wait_cannot_be_waited_is_refused() -> None:
    # 0.1 * 2**1999 s overflows a float: the retry itself would raise OverflowError mid-batch.
    with pytest.raises(ValueError, match=r"backoff=0.1 with retries=2000 .* lower retries or backoff"):
        sp.Engine(workers=1, retries=2000, backoff=0.1)


def test_many_retries_without_backoff_are_fine() -> None:
    with sp.Engine(workers=1, retries=5000, backoff=0) as engine:
        assert engine.map(_tasks.double, [1], timeout=WAIT).values == [2]
