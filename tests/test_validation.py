"""Hostile use of the configuration: every bad argument is refused at the door, naming itself.

Engines here are real (their workers start); a constructor that raises starts none.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------------------------------
# Sizes, initargs, booleans
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mem_per_task", "max_rss_per_worker", "shm_threshold"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_sizes_that_are_not_finite_are_named(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number of bytes"):
        sp.Engine(workers=1, **{name: value})  # type: ignore[arg-type]


def test_plan_workers_refuses_an_infinite_mem_per_task() -> None:
    with pytest.raises(ValueError, match="mem_per_task must be a finite number of bytes"):
        sp.plan_workers(mem_per_task=float("inf"))


@pytest.mark.parametrize("initargs", [5, "ab", {"a": 1}, None, iter([1])])
def test_initargs_must_be_a_tuple_or_list(initargs: object) -> None:
    with pytest.raises(TypeError, match=r"initargs must be a tuple or list .* initargs=\(x,\)"):
        sp.Engine(workers=1, initializer=_tasks.double, initargs=initargs)  # type: ignore[arg-type]


def test_initargs_as_a_list_reach_the_initializer() -> None:
    with sp.Engine(workers=1, initializer=_tasks.init_set, initargs=[7]) as engine:
        assert engine.map(_tasks.read_init, [0], timeout=WAIT).values == [[7]]


@pytest.mark.parametrize("name", ["progress", "writable_inputs"])
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_engine_flags_must_be_bools(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        sp.Engine(workers=1, **{name: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Per-call progress options: refused at the call, before any item runs
# --------------------------------------------------------------------------------------------------

BAD_CALL_OPTIONS = [
    ({"on_progress": "x"}, "on_progress must be a callable"),
    ({"progress": "no"}, "progress must be a bool"),
    ({"desc": 5}, "desc must be a str"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_CALL_OPTIONS)
def test_bad_progress_options_fail_map_and_imap_before_any_item(
    engine: sp.Engine, tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(TypeError, match=match):
        engine.map(_tasks.touch, [str(marker)], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=match):
        engine.imap(_tasks.touch, [str(marker)], **kwargs)  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.parametrize(("kwargs", "match"), BAD_CALL_OPTIONS)
def test_bad_progress_options_fail_the_async_calls_before_any_item(
    engine: sp.Engine, tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    marker = tmp_path / "ran"

    async def main() -> None:
        with pytest.raises(TypeError, match=match):
            await asyncio.wait_for(
                engine.map_async(_tasks.touch, [str(marker)], **kwargs),  # type: ignore[arg-type]
                WAIT)
        with pytest.raises(TypeError, match=match):
            engine.imap_async(_tasks.touch, [str(marker)], **kwargs)  # type: ignore[arg-type]

    asyncio.run(main())
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Explicit workers x mem_per_task beyond what memory allows: a warning at the caller's line
# --------------------------------------------------------------------------------------------------


def test_explicit_workers_beyond_the_memory_plan_warn_at_the_callers_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STAGEPOOL_MAX_WORKERS", raising=False)
    available = sp.plan_workers().mem_available
    per_task = available // 3 + 1  # memory allows 2 workers, asked for 4
    with pytest.warns(sp.OvercommitWarning, match=r"workers=4 x mem_per_task=.* memory allows 2 "
                      r"workers") as record:
        engine = sp.Engine(workers=4, mem_per_task=per_task)
    with engine:
        assert engine.workers == 4
        assert repr(engine).startswith("<stagepool.Engine 4 workers (explicit; the machine plan "
                                       "allows ")
    assert issubclass(sp.OvercommitWarning, UserWarning)
    assert [w.filename for w in record] == [__file__]


def test_explicit_workers_within_the_memory_plan_do_not_warn() -> None:
    with sp.Engine(workers=1, mem_per_task="1MiB") as engine:  # filterwarnings = error
        assert engine.workers == 1


# --------------------------------------------------------------------------------------------------
# Other hostile values: infinite timeouts, sizes no machine has, bools for ints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "error", "match"),
    [
        (float("inf"), ValueError, "timeout must be a finite number of seconds, got inf; use None"),
        (float("nan"), ValueError, "timeout must be a finite number of seconds, got nan"),
        (10**400, ValueError, "timeout must be a finite number of seconds"),
        (0, ValueError, "timeout must be > 0 seconds, got 0"),
        (-1.5, ValueError, "timeout must be > 0 seconds, got -1.5"),
        (True, TypeError, "timeout must be seconds"),
    ],
)
def test_bad_timeouts_are_refused_by_the_engine_and_per_call(
    engine: sp.Engine, timeout: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(workers=1, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        engine.map(_tasks.double, [1], timeout=timeout)


@pytest.mark.needs("hard_timeouts")
def test_a_month_long_timeout_is_accepted(engine: sp.Engine) -> None:
    with sp.Engine(workers=1, timeout=30 * 86400) as month:
        assert month.config.timeout == 30 * 86400.0
    assert engine.map(_tasks.double, [1, 2], timeout=30 * 86400).values == [2, 4]


@pytest.mark.needs("hard_timeouts")
def test_numpy_numbers_are_seconds_too(engine: sp.Engine) -> None:
    """``timeout=lambda seg: seg.duration * 4`` with a float32 duration failed every item
    ("must be seconds (a number) ... not np.float32(2.0)"), while ``cost=`` took the same
    value: any real number is seconds."""
    np = pytest.importorskip("numpy")
    report = engine.map(_tasks.double, [1, 2, 3], timeout=lambda x: np.float32(WAIT))
    assert report.values == [2, 4, 6]
    with sp.Engine(workers=1, timeout=np.int64(30)) as eng:
        assert eng.config.timeout == 30.0 and type(eng.config.timeout) is float
    with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
        engine.map(_tasks.double, [1], timeout=np.float64(-1))


@pytest.mark.needs("hard_timeouts")
def test_a_callable_timeout_returning_inf_fails_its_item_clearly(engine: sp.Engine) -> None:
    report = engine.map(_tasks.double, [1, 2, 3, 4], timeout=_tasks.inf_for_two, chunk_size=4)
    assert [o.kind for o in report] == ["ok", "error", "ok", "ok"]  # only the item whose limit is bad
    assert "timeout(item 1) must be a finite number of seconds, got inf; use None" in str(
        report[1].error)


@pytest.mark.needs("hard_timeouts")
def test_a_callable_timeout_that_raises_is_named_as_the_cause(engine: sp.Engine) -> None:
    # The item's error was the callable's bare ZeroDivisionError: it read as the function's.
    report = engine.map(_tasks.double, [1, 0, 3], timeout=lambda x: 10 / x, chunk_size=3)
    assert [o.kind for o in report] == ["ok", "error", "ok"]
    assert "timeout(item 1) raised ZeroDivisionError: division by zero" in str(report[1].error)
    assert isinstance(report[1].error.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("name", ["mem_per_task", "max_rss_per_worker"])
def test_sizes_beyond_any_machine_are_refused(name: str) -> None:
    # max_rss_per_worker=2**62 used to start workers that all died at start-up (the memory cap
    # 2 x the limit overflowed setrlimit), failing every item as a crash.
    with pytest.raises(ValueError, match=f"{name} must be at most 1 EiB"):
        sp.Engine(workers=1, **{name: 2**62})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"retries": True}, TypeError, "retries must be an int >= 0, not True"),
        ({"retries": 1.0}, TypeError, "retries must be an int >= 0, not 1.0"),
        ({"retries": -1}, ValueError, "retries must be >= 0, got -1"),
        ({"workers": "Auto"}, TypeError, "workers must be an int >= 1 or 'auto', not 'Auto'"),
        ({"workers": True}, TypeError, "workers must be an int >= 1 or 'auto', not True"),
        ({"max_tasks_per_worker": False}, TypeError, "max_tasks_per_worker must be an int >= 1"),
    ],
)
def test_ints_refuse_bools_floats_and_typos(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(**kwargs)  # type: ignore[arg-type]


def test_ordered_must_be_a_bool(engine: sp.Engine) -> None:
    with pytest.raises(TypeError, match="ordered must be a bool"):
        engine.imap(_tasks.double, [1], ordered="no")  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(TypeError, match="ordered must be a bool"):
            engine.imap_async(_tasks.double, [1], ordered=1)  # type: ignore[arg-type]

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------
# More workers than the process may open files for
# --------------------------------------------------------------------------------------------------

LOW_ULIMIT = """
import resource, sys
import psutil
import stagepool as sp
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
try:
    sp.Engine(workers=60)
except ValueError as exc:
    print("refused:", exc)
except BaseException as exc:
    print("other:", type(exc).__name__, exc)
else:
    print("started")
print("children:", len(psutil.Process().children(recursive=True)))
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
def test_workers_beyond_the_open_files_limit_are_refused_before_any_start() -> None:
    # Before: spawning failed deep inside loky after ~40 workers (EMFILE, or loky's own
    # UnboundLocalError), and the workers already started were left running.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("STAGEPOOL_MAX_WORKERS", None)
    out = subprocess.run([sys.executable, "-c", LOW_ULIMIT], capture_output=True, text=True,
                         timeout=WAIT, env=env).stdout
    assert "refused: workers=60 needs about 304 file descriptors" in out, out
    assert "ulimit -n" in out
    assert "children: 0" in out, out
