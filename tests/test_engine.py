"""The core engine on real worker processes: one outcome per item, in order, whatever happens."""

from __future__ import annotations

import concurrent.futures
import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _tasks
import stagepool as sp
from conftest import WAIT, wait_until


def test_map_returns_values_in_order(engine: sp.Engine) -> None:
    report = engine.map(_tasks.double, range(1000))
    assert report.values == [2 * i for i in range(1000)]
    assert [o.index for o in report] == list(range(1000))
    assert report.success_rate == 1.0 and report.ok
    assert all(o.kind == "ok" and o.ok and o.error is None for o in report)
    assert report.stats.items == 1000 and report.stats.chunks >= 1
    assert {o.worker for o in report} <= set(engine.worker_pids())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 300),
    chunk_size=st.one_of(st.just("auto"), st.integers(1, 64)),
    fail_every=st.integers(0, 9),
    as_generator=st.booleans(),
)
def test_one_outcome_per_item_in_order(
    engine: sp.Engine, n: int, chunk_size: int | str, fail_every: int, as_generator: bool
) -> None:
    flags = [(i, fail_every > 0 and i % fail_every == fail_every - 1) for i in range(n)]
    items = iter(flags) if as_generator else flags
    report = engine.map(_tasks.fail_on, items, chunk_size=chunk_size)
    assert len(report) == n
    for i, outcome in enumerate(report):
        assert outcome.index == i
        if flags[i][1]:
            assert outcome.kind == "error" and not outcome.ok
            assert isinstance(outcome.error, ValueError)
            assert str(outcome.error) == f"bad item {i}"
        else:
            assert outcome.ok and outcome.value == 3 * i
    failed = [i for i, (_, f) in enumerate(flags) if f]
    assert [o.index for o in report.failed] == failed
    assert report.success_rate == ((n - len(failed)) / n if n else 0.0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 200), ordered=st.booleans(), chunk_size=st.integers(1, 40))
def test_imap_gives_each_index_once(engine: sp.Engine, n: int, ordered: bool, chunk_size: int) -> None:
    outcomes = list(engine.imap(_tasks.double, range(n), ordered=ordered, chunk_size=chunk_size))
    indices = [o.index for o in outcomes]
    assert sorted(indices) == list(range(n))
    if ordered:
        assert indices == list(range(n))
    assert all(o.value == 2 * o.index for o in outcomes)


def test_exception_keeps_type_and_worker_traceback(engine: sp.Engine) -> None:
    report = engine.map(_tasks.fail_on, [(0, False), (1, True)])
    err = report[1].error
    assert type(err) is ValueError
    cause = err.__cause__
    assert cause is not None and type(cause).__name__ == "RemoteTraceback"
    assert "in fail_on" in str(cause) and "ValueError: bad item 1" in str(cause)
    assert report[1].traceback is not None and "in fail_on" in report[1].traceback
    # It starts at the item's own code: the worker's loop frames say nothing about the item.
    assert report[1].traceback.splitlines()[1].endswith(", in fail_on"), report[1].traceback
    submitted = engine.submit(_tasks.fail_on, (1, True)).exception(timeout=60)
    assert submitted is not None and "_worker.py" not in str(submitted.__cause__)
    with pytest.raises(ValueError, match="bad item 1"):
        report[1].unwrap()
    assert report[0].unwrap() == 0


@pytest.mark.needs("serializes")
def test_exception_that_cannot_be_rebuilt_becomes_remote_error(engine: sp.Engine) -> None:
    for fn, type_name in [(_tasks.raise_unrebuildable, "NeedsTwoArgs"),
                          (_tasks.raise_unpicklable, "HoldsLock")]:
        report = engine.map(fn, [5])
        err = report[0].error
        assert isinstance(err, sp.RemoteError), err
        assert report[0].kind == "error"
        assert type_name in err.type_name and type_name in str(err)
        assert "Traceback" in err.remote_traceback
    assert engine.map(_tasks.double, [1]).values == [2]  # the pool is fine


@pytest.mark.needs("serializes")
def test_unpicklable_argument_fails_only_its_item(engine: sp.Engine) -> None:
    items = [1, 2, threading.Lock(), 4]
    report = engine.map(_tasks.identity, items, chunk_size=4)
    assert [o.kind for o in report] == ["ok", "ok", "serialization", "ok"]
    err = report[2].error
    assert isinstance(err, sp.SerializationError)
    assert "item 2" in str(err) and "lock" in str(err).lower()
    assert report.values == [1, 2, 4]


@pytest.mark.needs("serializes")
def test_unpicklable_result_fails_only_its_item(engine: sp.Engine) -> None:
    report = engine.map(_tasks.return_lock, range(5), chunk_size=5)
    assert [o.kind for o in report] == ["ok", "ok", "serialization", "ok", "ok"]
    assert "item 2" in str(report[2].error) and "cannot be pickled" in str(report[2].error)


@pytest.mark.needs("serializes")
def test_unpicklable_function_fails_every_item(engine: sp.Engine) -> None:
    lock = threading.Lock()
    report = engine.map(lambda x: (lock, x), range(3))
    assert [o.kind for o in report] == ["serialization"] * 3
    assert "cannot be pickled" in str(report[0].error) and "item 0" in str(report[0].error)


@pytest.mark.needs("serializes")
def test_argument_that_fails_to_unpickle_in_worker(engine: sp.Engine) -> None:
    items = [1, _tasks.BreaksInWorker(2), 3, 4]
    report = engine.map(_tasks.identity, items, chunk_size=4)
    assert [o.kind for o in report] == ["ok", "serialization", "ok", "ok"]
    assert "item 1" in str(report[1].error) and "unpickled in the worker" in str(report[1].error)


@pytest.mark.needs("serializes")
def test_result_that_fails_to_unpickle_in_parent(engine: sp.Engine) -> None:
    report = engine.map(_tasks.return_breaks_in_parent, range(6), chunk_size=6)
    assert [o.kind for o in report] == ["ok"] * 3 + ["serialization"] + ["ok"] * 2
    assert "item 3" in str(report[3].error) and "unpickled in the parent" in str(report[3].error)


@pytest.mark.needs("processes")
def test_systemexit_and_keyboardinterrupt_are_item_errors(engine: sp.Engine) -> None:
    before = set(engine.worker_pids())
    report = engine.map(_tasks.raise_systemexit, range(4), chunk_size=4)
    assert [o.kind for o in report] == ["ok", "error", "error", "ok"]
    # Wrapped: a worker's exit or Ctrl-C must not pass for the caller's own.
    exit_, interrupt = report[1].error, report[2].error
    assert isinstance(exit_, sp.RemoteError) and exit_.type_name == "SystemExit"
    assert isinstance(exit_.__cause__, SystemExit) and exit_.__cause__.code == 7
    assert "in raise_systemexit" in str(exit_.__cause__.__cause__)  # the worker's traceback
    assert isinstance(interrupt, sp.RemoteError)
    assert isinstance(interrupt.__cause__, KeyboardInterrupt)
    with pytest.raises(sp.RemoteError, match="KeyboardInterrupt"):
        report[2].unwrap()
    with pytest.raises(ExceptionGroup) as info:  # not a BaseExceptionGroup: except Exception works
        report.raise_on_failure()
    assert [type(e.__cause__) for e in info.value.exceptions] == [SystemExit, KeyboardInterrupt]
    with pytest.raises(sp.RemoteError, match="SystemExit: 7"):
        engine.submit(_tasks.raise_systemexit, 1).result(timeout=WAIT)
    assert set(engine.worker_pids()) == before  # nobody died


@pytest.mark.needs("serializes")
def test_retry_on_matches_an_exception_that_cannot_be_rebuilt(engine: sp.Engine) -> None:
    # It arrives as a RemoteError; retry_on still names its class (or a base class).
    for retry_on, attempts in [((_tasks.NeedsTwoArgs,), 2), ((_tasks.StageFailure,), 2),
                               ((_tasks.HoldsLock,), 2), ((OSError,), 1)]:
        view = engine.with_options(retries=1, retry_on=retry_on)
        fn = _tasks.raise_unpicklable if retry_on[0] is _tasks.HoldsLock else _tasks.raise_unrebuildable
        report = view.map(fn, [5])
        assert isinstance(report[0].error, sp.RemoteError), report[0].error
        assert report[0].attempts == attempts, (retry_on, report[0])


def test_retry_on_names_the_wrapped_base_exception() -> None:
    with sp.Engine(workers=1, retries=1, retry_on=(KeyboardInterrupt,)) as eng:
        report = eng.map(_tasks.raise_systemexit, [1, 2])
    assert [o.attempts for o in report] == [1, 2]


def test_lambdas_and_closures(engine: sp.Engine) -> None:
    offset = 10
    assert engine.map(lambda x: x + offset, range(5)).values == [10, 11, 12, 13, 14]

    def nested(x: int) -> int:
        return x * offset

    assert engine.map(nested, [1, 2]).values == [10, 20]


def test_ordinary_odd_items(engine: sp.Engine) -> None:
    items = [None, 0, "", (), None, 0, 0]
    report = engine.map(_tasks.identity, items)
    assert report.values == items and len(report) == 7


def test_zero_items(engine: sp.Engine) -> None:
    report = engine.map(_tasks.double, [])
    assert len(report) == 0 and report.values == [] and report.success_rate == 0.0
    assert list(engine.imap(_tasks.double, iter([]))) == []


def test_generator_that_raises_midway_attaches_partial_report(engine: sp.Engine) -> None:
    def items() -> Iterator[int]:
        yield from range(25)
        raise OSError("segment file vanished")

    with pytest.raises(OSError, match="segment file vanished") as info:
        engine.map(_tasks.double, items())
    report = info.value.report  # type: ignore[attr-defined]
    assert report.values == [2 * i for i in range(25)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1 or 'auto'"),
        ({"chunk_size": "big"}, TypeError, "chunk_size"),
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"workers": "many"}, TypeError, "workers"),
        ({"mem_per_task": "12XB"}, ValueError, "mem_per_task"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retry_on": ("bogus",)}, ValueError, "retry_on"),
        ({"initializer": 3}, TypeError, "initializer"),
    ],
)
def test_bad_engine_arguments_are_named(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(**kwargs)  # type: ignore[arg-type]


def test_bad_call_arguments_are_named(engine: sp.Engine) -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        engine.map(3, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="items must be iterable"):
        engine.map(_tasks.double, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        engine.map(_tasks.double, [1], chunk_size=0)


def test_a_string_is_one_item_not_a_list_of_characters(engine: sp.Engine) -> None:
    """``map(decode, "talk.wav")`` ran decode on "t", "a", "l", ... and reported 8 errors."""
    with pytest.raises(TypeError, match=r"items is a str \('talk.wav'\).*\['talk.wav'\]"):
        engine.map(_tasks.double, "talk.wav")
    with pytest.raises(TypeError, match="items is a bytes"):
        engine.imap(_tasks.double, b"abc")
    assert engine.map(_tasks.double, list("ab")).values == ["aa", "bb"]


async def _coroutine_double(x: int) -> int:
    return 2 * x


def test_a_coroutine_function_is_refused_at_the_door(engine: sp.Engine) -> None:
    """Its items were silent "ok"s holding never-awaited coroutines on the serial backend, and
    "serialization" failures (a coroutine cannot be pickled) on the local one."""
    import asyncio

    calls: list[Callable[[], object]] = [
        lambda: engine.map(_coroutine_double, [1]),
        lambda: engine.imap(_coroutine_double, [1]),
        lambda: engine.submit(_coroutine_double, 1),
        lambda: engine.imap_async(_coroutine_double, [1]),
        lambda: asyncio.run(engine.map_async(_coroutine_double, [1])),
        lambda: asyncio.run(engine.submit_async(_coroutine_double, 1)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="fn must be a plain function, not a coroutine function"):
            call()
    assert engine.map(_tasks.double, [1]).values == [2]


def test_an_async_iterable_given_to_map_or_imap_points_to_the_async_calls(
        engine: sp.Engine) -> None:
    """It failed with Python's own "'async_generator' object is not iterable", naming neither
    the argument nor the calls that take one (imap's only at the first next())."""
    async def numbers() -> Any:
        yield 1

    with pytest.raises(TypeError, match=r"items is an async iterable .*: use map_async"):
        engine.map(_tasks.double, numbers())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"items is an async iterable .*: use map_async"):
        engine.imap(_tasks.double, numbers())  # type: ignore[arg-type]


def test_imap_streams_an_endless_generator_lazily(engine: sp.Engine) -> None:
    taken = 0

    def endless() -> Iterator[int]:
        nonlocal taken
        while True:
            taken += 1
            yield taken

    stream = engine.imap(_tasks.double, endless(), chunk_size=10, max_in_flight=3)
    got = [next(stream) for _ in range(100)]
    assert [o.index for o in got] == list(range(100))
    assert taken <= 100 + 3 * 10 + 10  # bounded read-ahead: in-flight chunks only
    stream.close()  # type: ignore[attr-defined]
    assert engine.map(_tasks.double, [3]).values == [6]  # the engine still serves


def test_submit_and_executor_view(engine: sp.Engine) -> None:
    assert engine.submit(pow, 2, 10).result(timeout=WAIT) == 1024
    future = engine.submit(_tasks.fail_on, (1, True))
    with pytest.raises(ValueError, match="bad item 1"):
        future.result(timeout=WAIT)
    ex = engine.executor
    assert isinstance(ex, concurrent.futures.Executor)
    assert list(ex.map(pow, [2, 3], [3, 2])) == [8, 9]
    results = ex.map(_tasks.fail_on, [(1, False), (2, True)])
    assert next(results) == 3
    with pytest.raises(ValueError):
        next(results)
    futures = [ex.submit(_tasks.double, i) for i in range(20)]
    assert [f.result(timeout=WAIT) for f in futures] == [2 * i for i in range(20)]


def test_many_threads_share_one_engine(engine: sp.Engine) -> None:
    def work(k: int) -> list[int]:
        return engine.map(_tasks.double, range(k, k + 200)).values

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(0, 1600, 200)))
    for k, values in zip(range(0, 1600, 200), results, strict=True):
        assert values == [2 * i for i in range(k, k + 200)]


@pytest.mark.needs("processes")
def test_engine_is_reused_and_threads_are_budgeted(engine: sp.Engine) -> None:
    pids = set(engine.worker_pids())
    for _ in range(5):
        engine.map(_tasks.double, range(50))
    assert set(engine.worker_pids()) == pids
    budget = str(max(1, engine.plan.cpus // engine.workers))
    assert set(engine.map(_tasks.env_of, ["OMP_NUM_THREADS"] * 4).values) == {budget}


def test_initializer_runs_in_each_worker() -> None:
    with sp.Engine(workers=2, initializer=_tasks.init_set, initargs=(42,)) as eng:
        assert engine_values(eng, _tasks.read_init, range(4)) == [[42]] * 4


def test_failing_initializer_fails_items_without_respawn_storm() -> None:
    with sp.Engine(workers=2, initializer=_tasks.init_fail) as eng:
        pids = set(eng.worker_pids())
        report = eng.map(_tasks.double, range(10))
        assert [o.kind for o in report] == ["error"] * 10
        assert "initializer failed" in str(report[0].error)
        assert "cannot open the model file" in str(report[0].error)
        assert set(eng.worker_pids()) == pids


def engine_values(eng: sp.Engine, fn, items) -> list:  # type: ignore[no-untyped-def]
    return eng.map(fn, items).values


def test_report_api(engine: sp.Engine) -> None:
    report = engine.map(_tasks.fail_on, [(i, i in (3, 7)) for i in range(10)])
    assert [o.index for o in report.successful] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert [o.index for o in report.failed] == [3, 7]
    assert report.success_rate == 0.8
    text = report.summary()
    assert "10 items: 8 ok, 2 failed" in text and "item 3" in text and "bad item 7" in text
    with pytest.raises(ExceptionGroup) as info:
        report.raise_on_failure()
    group = info.value
    assert len(group.exceptions) == 2
    assert "stagepool: item 3 (error)" in group.exceptions[0].__notes__
    clean = engine.map(_tasks.double, [1])
    assert clean.raise_on_failure() is clean
    assert report[-1].index == 9 and [o.index for o in report[2:4]] == [2, 3]
    with pytest.raises(IndexError):
        report[10]
    assert all(o.duration >= 0 for o in report)


def test_progress_callback_and_plain_bar(engine: sp.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[sp.Progress] = []
    engine.map(_tasks.fail_on, [(i, i == 5) for i in range(100)], on_progress=seen.append)
    assert seen and seen[-1].done == 100 and seen[-1].failed == 1 and seen[-1].total == 100
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    fake_err = io.StringIO()
    monkeypatch.setattr("sys.stderr", fake_err)
    engine.map(_tasks.double, range(100), progress=True, desc="segments")
    out = fake_err.getvalue()
    assert "segments: 100/100 done, 0 failed" in out and "\r" not in out


def test_shutdown_then_submit_is_a_clear_error() -> None:
    eng = sp.Engine(workers=1)
    eng.shutdown()
    eng.shutdown()  # idempotent
    with pytest.raises(sp.EngineClosed, match="shut down"):
        eng.map(_tasks.double, [1])
    with pytest.raises(sp.EngineClosed):
        eng.submit(_tasks.double, 1)


def test_max_concurrent_bounds_items_in_workers(engine: sp.Engine) -> None:
    seen: list[int] = []
    report = engine.map(_tasks.pid_of, range(40), max_concurrent=1,
                        on_progress=lambda p: seen.append(p.done))
    assert len(report) == 40 and report.ok
    assert report.stats.chunks == 40  # one item at a time: every chunk holds a single item
    with pytest.raises(ValueError, match="max_concurrent"):
        engine.map(_tasks.double, [1], max_concurrent=0)


def test_many_distinct_functions_then_the_first_again(engine: sp.Engine) -> None:
    # Workers keep 16 unpickled functions; the parent mirrors that cache exactly.
    def adder(k: int) -> Callable[[int], int]:
        return lambda x: x + k

    fns = [adder(k) for k in range(40)]
    for k, fn in enumerate(fns):
        assert engine.map(fn, [1, 2]).values == [1 + k, 2 + k]
    assert engine.map(fns[0], [5]).values == [5]
    assert engine.map(_tasks.double, range(10)).values == [2 * i for i in range(10)]


@pytest.mark.needs("processes")
def test_a_running_submit_cannot_be_cancelled_like_the_stdlib_executors(engine: sp.Engine) -> None:
    running = engine.submit(_tasks.sleep_for, 0.5)
    assert wait_until(running.running, timeout=WAIT)
    assert not running.cancel()  # handed to a worker: it runs to the end
    assert running.result(timeout=WAIT) == 0.5 and not running.cancelled()
    # and one that was cancelled while queued never starts, even after others were learned short
    for _ in range(3):
        assert engine.submit(_tasks.double, 1).result(timeout=WAIT) == 2
    blockers = [engine.submit(_tasks.sleep_for, 0.5) for _ in range(engine.workers)]
    queued = engine.submit(_tasks.double, 7)
    assert not queued.running() and queued.cancel() and queued.cancelled()
    assert [f.result(timeout=WAIT) for f in blockers] == [0.5] * engine.workers


@pytest.mark.needs("processes", "fast_round_trip")
def test_many_single_submits_stay_fast(engine: sp.Engine) -> None:
    import time as _time

    started = _time.monotonic()
    futures = [engine.submit(_tasks.double, i) for i in range(3000)]
    assert [f.result(timeout=WAIT) for f in futures] == [2 * i for i in range(3000)]
    assert _time.monotonic() - started < WAIT  # was quadratic: one fair-share group per call


@pytest.mark.needs("processes")
def test_a_queued_single_submit_cancels_alone(engine: sp.Engine) -> None:
    blockers = [engine.submit(_tasks.sleep_for, 0.5) for _ in range(engine.workers)]
    queued = [engine.submit(_tasks.double, i) for i in range(5)]
    assert queued[2].cancel()
    assert [f.result(timeout=WAIT) for i, f in enumerate(queued) if i != 2] == [0, 2, 6, 8]
    assert queued[2].cancelled()
    assert [f.result(timeout=WAIT) for f in blockers] == [0.5] * engine.workers
