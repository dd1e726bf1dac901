"""The executor contract: every public behaviour of ``concurrent.futures`` (``Executor``,
``Future``, ``wait``, ``as_completed``, ``ProcessPoolExecutor``'s constructor options), one test
each, run against executors that must be interchangeable:

    stdlib        concurrent.futures.ProcessPoolExecutor (the reference)
    engine-view   stagepool.Engine(...).executor
    drop-in       stagepool.ProcessPoolExecutor(...): the same view over an engine of its own, so
                  it runs the rows marked ``@also_drop_in`` (its constructor, shutdown, exit, a
                  sample of the rest) and the rows about the constructor's arguments

Each row asserts one observable result, the same for all, except the rows marked
``@difference(key)``: there stagepool differs on purpose, each side's behaviour is asserted, and
the README's "Drop-in for concurrent.futures" section lists the difference (checked below).
Every wait is bounded; no row leaves a call running longer than a couple of seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, wait_until

KINDS = ("stdlib", "engine-view")
ALL_KINDS = (*KINDS, "drop-in")
CONSTRUCTORS = ("stdlib", "drop-in")  # rows about ProcessPoolExecutor(...) arguments themselves
# The stdlib's workers start from a fork server: forking this multi-threaded test process
# directly is what Python 3.12 warns about.
FORKSERVER = multiprocessing.get_context("forkserver")
README = Path(__file__).resolve().parent.parent / "README.md"

# Deliberate differences: key -> the words of the README's list that explain it.
DIFFERENCES = {
    "never-broken": "never broken",
    "pickling-error": "SerializationError",
    "by-value-functions": "lambdas",
    "at-the-door": "at the door",
    "fresh-workers": "fresh interpreter",
    "planned-workers": "plan_workers",
    "engine-left-open": "left open",
    "base-exceptions": "SystemExit",
}


def difference(key: str) -> pytest.MarkDecorator:
    """Marks a row where stagepool differs on purpose (``DIFFERENCES[key]``)."""
    assert key in DIFFERENCES, key
    return pytest.mark.difference(key)


def build(kind: str, max_workers: int | None = 2, **options: Any) -> cf.Executor:
    """A new executor of ``kind`` with the standard library's constructor options."""
    if kind == "stdlib":
        options.setdefault("mp_context", FORKSERVER)
        return cf.ProcessPoolExecutor(max_workers, **options)
    if kind == "drop-in":
        return sp.ProcessPoolExecutor(max_workers, **options)
    engine = sp.Engine(workers="auto" if max_workers is None else max_workers,
                       initializer=options.get("initializer"), initargs=options.get("initargs", ()),
                       max_tasks_per_worker=options.get("max_tasks_per_child"))
    return engine.executor


def also_drop_in(row: Callable[..., None]) -> Callable[..., None]:
    """Runs the row on ``stagepool.ProcessPoolExecutor`` too."""
    row.kinds = ALL_KINDS  # type: ignore[attr-defined]
    return row


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every row that takes ``kind`` and does not choose its own runs on ``KINDS`` (module-scoped,
    so that the rows of one kind share one executor)."""
    chosen = any(mark.args[0] == "kind" for mark in metafunc.definition.iter_markers("parametrize"))
    if "kind" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("kind", getattr(metafunc.function, "kinds", KINDS), scope="module")


@pytest.fixture(scope="module")
def executor(kind: str) -> Iterator[cf.Executor]:
    """One executor per kind for the rows that leave it serving."""
    shared = build(kind)
    yield shared
    shared.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def make(kind: str) -> Iterator[Callable[..., cf.Executor]]:
    """Fresh executors (with options, or to shut down or break), all shut down afterwards."""
    made: list[cf.Executor] = []

    def make_one(max_workers: int | None = 2, **options: Any) -> cf.Executor:
        made.append(build(kind, max_workers, **options))
        return made[-1]

    yield make_one
    for one in made:
        one.shutdown(wait=True, cancel_futures=True)


def outcome_of(executor: cf.Executor, fn: Callable[..., Any], *args: Any) -> Any:
    """The value of ``fn(*args)``, or the exception it ended with, whether ``submit`` or
    ``result`` raised it."""
    try:
        return executor.submit(fn, *args).result(timeout=WAIT)
    except Exception as exc:
        return exc


def shutdown_within(executor: cf.Executor, seconds: float = WAIT) -> bool:
    waiter = threading.Thread(target=executor.shutdown, daemon=True)
    waiter.start()
    waiter.join(seconds)
    return not waiter.is_alive()


# ---- Executor.submit ----------------------------------------------------------------------------

@also_drop_in
def test_submit_returns_a_future_of_the_value(executor: cf.Executor) -> None:
    future = executor.submit(_tasks.add, 1, 2, c=3)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=WAIT) == 6


def test_submit_passes_a_keyword_named_fn(executor: cf.Executor) -> None:
    assert executor.submit(_tasks.kwargs_of, fn=1).result(timeout=WAIT) == {"fn": 1}


@also_drop_in
def test_an_exception_comes_back_with_the_worker_traceback(executor: cf.Executor) -> None:
    future = executor.submit(_tasks.fail_on, (4, True))
    with pytest.raises(ValueError, match="bad item 4") as info:
        future.result(timeout=WAIT)
    assert "fail_on" in str(info.value.__cause__)
    assert isinstance(future.exception(timeout=WAIT), ValueError)


@difference("base-exceptions")
def test_system_exit_in_a_call_is_that_calls_exception(kind: str, executor: cf.Executor) -> None:
    error = executor.submit(_tasks.raise_systemexit, 1).exception(timeout=WAIT)
    if kind == "stdlib":
        assert isinstance(error, SystemExit)
    else:  # result() must not exit the caller: the worker's SystemExit is the cause
        assert isinstance(error, sp.RemoteError) and isinstance(error.__cause__, SystemExit)
    assert executor.submit(_tasks.double, 2).result(timeout=WAIT) == 4


@difference("at-the-door")
def test_a_non_callable_is_a_type_error(kind: str, executor: cf.Executor) -> None:
    if kind == "stdlib":
        future = executor.submit(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not callable"):
            future.result(timeout=WAIT)
    else:
        with pytest.raises(TypeError, match="callable"):
            executor.submit(42)  # type: ignore[arg-type]


@also_drop_in
def test_submit_after_shutdown_is_a_runtime_error(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(_tasks.double, 1)


# ---- Executor.map -------------------------------------------------------------------------------

@also_drop_in
def test_map_gives_results_in_order_over_the_shortest_iterable(executor: cf.Executor) -> None:
    assert list(executor.map(pow, [2, 3, 4], [5, 2])) == [32, 9]
    assert list(executor.map(_tasks.double, [])) == []


def test_map_reads_the_iterables_when_called(executor: cf.Executor) -> None:
    taken: list[int] = []

    def items() -> Iterator[int]:
        for i in range(5):
            taken.append(i)
            yield i

    results = executor.map(_tasks.double, items())
    assert taken == [0, 1, 2, 3, 4]
    assert list(results) == [0, 2, 4, 6, 8]


def test_map_raises_an_exception_when_its_result_is_reached(executor: cf.Executor) -> None:
    results = executor.map(_tasks.fail_on, [(1, False), (2, True), (3, False)])
    assert next(results) == 3
    with pytest.raises(ValueError, match="bad item 2"):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 2, 5, 100])
def test_map_chunksize_keeps_results_and_order(executor: cf.Executor, chunksize: int) -> None:
    assert list(executor.map(_tasks.double, range(23), chunksize=chunksize)) == \
        [2 * i for i in range(23)]


@pytest.mark.parametrize("chunksize", [0, -3])
def test_map_chunksize_below_one_is_a_value_error(executor: cf.Executor, chunksize: int) -> None:
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        executor.map(_tasks.double, [1], chunksize=chunksize)


def test_map_timeout_is_raised_at_the_deadline_while_a_call_runs(
        make: Callable[..., cf.Executor]) -> None:
    executor = make()
    assert list(executor.map(_tasks.double, [1, 2])) == [2, 4]  # started: the deadline is short
    results = executor.map(_tasks.sleep_for, [0.0, 2.5], timeout=1.0)
    assert next(results) == 0.0
    with pytest.raises(TimeoutError):
        next(results)


def test_map_then_shutdown_still_yields_every_result(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    results = executor.map(_tasks.double, range(10))
    assert shutdown_within(executor)
    assert list(results) == [2 * i for i in range(10)]


def test_leaving_map_early_cancels_the_calls_not_started(
        make: Callable[..., cf.Executor], tmp_path: Path) -> None:
    executor = make(max_workers=1)
    paths = [str(tmp_path / f"{i}") for i in range(12)]
    results = executor.map(_tasks.sleep_then_touch, paths, [0.2] * 12)
    assert next(results) == paths[0]
    del results  # closes the iterator: what has not started never runs
    assert shutdown_within(executor)
    ran = sum(os.path.exists(p) for p in paths)
    assert 1 <= ran < 12


# ---- shutdown -----------------------------------------------------------------------------------

@also_drop_in
def test_shutdown_waits_for_every_call(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    futures = [executor.submit(_tasks.sleep_for, 0.1) for _ in range(6)]
    assert shutdown_within(executor)
    assert all(f.done() and f.result() == 0.1 for f in futures)


def test_shutdown_without_waiting_returns_and_the_calls_still_finish(
        make: Callable[..., cf.Executor]) -> None:
    executor = make()
    futures = [executor.submit(_tasks.sleep_for, 0.3) for _ in range(3)]
    executor.shutdown(wait=False)
    assert [f.result(timeout=WAIT) for f in futures] == [0.3] * 3


def test_shutdown_cancel_futures_leaves_every_future_done(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    futures = [executor.submit(_tasks.sleep_for, 0.2) for _ in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    assert all(f.result() == 0.2 for f in futures if not f.cancelled())


def test_shutdown_twice_is_harmless(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    executor.shutdown()
    executor.shutdown(wait=False)


@also_drop_in
def test_a_with_block_shuts_down_waiting(make: Callable[..., cf.Executor]) -> None:
    with make() as executor:
        futures = [executor.submit(_tasks.sleep_for, 0.1) for _ in range(4)]
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        executor.submit(_tasks.double, 1)


# ---- Future -------------------------------------------------------------------------------------

def test_result_timeout_raises_then_the_value_arrives(executor: cf.Executor) -> None:
    future = executor.submit(_tasks.sleep_for, 0.5)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)
    assert future.result(timeout=WAIT) == 0.5


def test_a_future_goes_pending_running_done(executor: cf.Executor) -> None:
    future = executor.submit(_tasks.sleep_for, 0.5)
    assert wait_until(lambda: future.running() or future.done())
    assert future.result(timeout=WAIT) == 0.5
    assert future.done() and not future.running() and not future.cancelled()


def test_a_queued_future_cancels_a_running_one_does_not(make: Callable[..., cf.Executor]) -> None:
    executor = make()
    blockers = [executor.submit(_tasks.sleep_for, 0.5) for _ in range(2)]
    queued = [executor.submit(_tasks.double, i) for i in range(4)]
    assert wait_until(lambda: all(b.running() or b.done() for b in blockers))
    assert not any(b.cancel() for b in blockers)
    last = queued[-1]
    assert last.cancel() and last.cancelled() and last.done()
    with pytest.raises(cf.CancelledError):
        last.result(timeout=WAIT)
    with pytest.raises(cf.CancelledError):
        last.exception(timeout=WAIT)
    assert [f.result(timeout=WAIT) for f in queued[:-1]] == [0, 2, 4]


def test_done_callbacks_run_once_done_and_at_once_when_already_done(executor: cf.Executor) -> None:
    seen: list[cf.Future[Any]] = []
    called = threading.Event()
    future = executor.submit(_tasks.double, 3)
    future.add_done_callback(lambda f: (seen.append(f), called.set()))
    assert called.wait(WAIT) and seen == [future]
    future.add_done_callback(seen.append)  # already done: runs here, now
    assert seen == [future, future]


def test_exception_is_none_for_a_value(executor: cf.Executor) -> None:
    assert executor.submit(_tasks.double, 1).exception(timeout=WAIT) is None


# ---- wait and as_completed ------------------------------------------------------------------------

def test_wait_all_completed(executor: cf.Executor) -> None:
    futures = [executor.submit(_tasks.double, i) for i in range(5)]
    done, not_done = cf.wait(futures, timeout=WAIT)
    assert done == set(futures) and not not_done


def test_wait_first_completed_and_timeout(executor: cf.Executor) -> None:
    quick, slow = executor.submit(_tasks.double, 1), executor.submit(_tasks.sleep_for, 0.8)
    done, not_done = cf.wait([quick, slow], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
    assert quick in done and slow in not_done
    done, not_done = cf.wait([slow], timeout=0.05)
    assert not done and not_done == {slow}
    assert slow.result(timeout=WAIT) == 0.8


def test_wait_first_exception(executor: cf.Executor) -> None:
    failing = executor.submit(_tasks.fail_on, (1, True))
    slow = executor.submit(_tasks.sleep_for, 0.8)
    done, not_done = cf.wait([failing, slow], timeout=WAIT, return_when=cf.FIRST_EXCEPTION)
    assert failing in done and slow in not_done
    assert slow.result(timeout=WAIT) == 0.8


def test_as_completed_yields_each_future_once_as_it_finishes(executor: cf.Executor) -> None:
    quick = executor.submit(_tasks.double, 2)
    slow = executor.submit(_tasks.sleep_for, 0.5)
    order = list(cf.as_completed([slow, quick, quick], timeout=WAIT))
    assert order == [quick, slow]


def test_as_completed_timeout(executor: cf.Executor) -> None:
    slow = executor.submit(_tasks.sleep_for, 0.5)
    with pytest.raises(TimeoutError):
        list(cf.as_completed([slow], timeout=0.05))
    assert slow.result(timeout=WAIT) == 0.5


@also_drop_in
def test_run_in_executor(executor: cf.Executor) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(executor, _tasks.double, 21), WAIT)

    assert asyncio.run(main()) == 42


# ---- pickling -------------------------------------------------------------------------------------

def test_an_argument_that_refuses_pickling_is_a_pickling_error(executor: cf.Executor) -> None:
    error = outcome_of(executor, _tasks.identity, _tasks.RefusesPickle())
    assert isinstance(error, pickle.PicklingError), repr(error)
    assert executor.submit(_tasks.double, 1).result(timeout=WAIT) == 2


def test_a_result_that_refuses_pickling_is_a_pickling_error(executor: cf.Executor) -> None:
    error = outcome_of(executor, _tasks.return_refuses_pickle, 1)
    assert isinstance(error, pickle.PicklingError), repr(error)
    assert executor.submit(_tasks.double, 1).result(timeout=WAIT) == 2


@difference("pickling-error")
def test_an_unpicklable_lock(kind: str, executor: cf.Executor) -> None:
    for error in (outcome_of(executor, _tasks.identity, threading.Lock()),
                  outcome_of(executor, _tasks.return_lock, 2)):
        if kind == "stdlib":
            assert isinstance(error, TypeError) and "lock" in str(error)
        else:  # one type for every pickling failure; the original is its cause
            assert isinstance(error, sp.SerializationError) and isinstance(error, pickle.PicklingError)
            assert "lock" in str(error.__cause__)


@difference("by-value-functions")
def test_a_lambda(kind: str, executor: cf.Executor) -> None:
    result = outcome_of(executor, lambda x: x + 1, 1)
    if kind == "stdlib":
        assert isinstance(result, pickle.PicklingError | AttributeError), repr(result)
    else:
        assert result == 2


# ---- a broken worker ------------------------------------------------------------------------------

@difference("never-broken")
@pytest.mark.parametrize(("fn", "arg"), [
    (_tasks.hard_exit, 0),                       # the worker dies
    (_tasks.raise_unrebuildable, 1),             # an exception the parent cannot rebuild
    (_tasks.return_breaks_in_parent, 3),         # a result the parent cannot unpickle
    (_tasks.identity, _tasks.BreaksInWorker(1)),  # an argument the worker cannot unpickle
], ids=["worker-dies", "unrebuildable-exception", "result-breaks-in-parent",
        "argument-breaks-in-worker"])
def test_a_call_that_breaks_a_worker(kind: str, make: Callable[..., cf.Executor],
                                     fn: Callable[[Any], Any], arg: Any) -> None:
    executor = make()
    error = outcome_of(executor, fn, arg)
    after = outcome_of(executor, _tasks.double, 21)
    if kind == "stdlib":  # the whole pool is broken: every later call fails
        assert isinstance(error, BrokenProcessPool), repr(error)
        assert isinstance(after, BrokenProcessPool), repr(after)
    else:  # only this call fails; the worker is replaced
        assert isinstance(error, sp.WorkerCrashed | sp.RemoteError | sp.SerializationError), \
            repr(error)
        assert after == 42
    if fn is _tasks.hard_exit:  # a dead worker is a BrokenProcessPool on both sides
        assert isinstance(error, BrokenProcessPool)


@also_drop_in
@difference("never-broken")
def test_a_failing_initializer(kind: str, make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=1, initializer=_tasks.init_fail)
    for _ in range(2):  # every call fails the same way, at submit or at result
        error = outcome_of(executor, _tasks.double, 1)
        assert isinstance(error, BrokenProcessPool), repr(error)
        if kind != "stdlib":  # it says why, and the worker was not respawned in a loop
            assert isinstance(error, sp.InitializerError) and "cannot open the model file" in str(error)


# ---- constructor options --------------------------------------------------------------------------

def test_max_workers_bounds_the_processes(make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=2)
    pids = set(executor.map(_tasks.sleep_then_pid, [0.05] * 8))
    assert 1 <= len(pids) <= 2


@also_drop_in
@difference("planned-workers")
def test_max_workers_none(kind: str, make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=None)
    assert executor.submit(_tasks.double, 1).result(timeout=WAIT) == 2
    if kind == "stdlib":
        assert executor._max_workers == os.cpu_count()  # type: ignore[attr-defined]
    elif kind == "drop-in":  # what the machine allows (affinity, cgroup quotas, the ceiling)
        assert isinstance(executor, sp.ProcessPoolExecutor)
        assert executor.engine.workers == executor.engine.plan.workers


@pytest.mark.parametrize("kind", CONSTRUCTORS)
@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_below_one_is_a_value_error(kind: str, bad: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        build(kind, bad)


@also_drop_in
def test_initializer_runs_in_each_worker_with_initargs(make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=1, initializer=_tasks.init_set, initargs=(42,))
    assert executor.submit(_tasks.read_init, None).result(timeout=WAIT) == [42]


@also_drop_in
def test_max_tasks_per_child_gives_each_call_a_fresh_worker(
        make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=2, max_tasks_per_child=1)
    futures = [executor.submit(_tasks.pid_of, i) for i in range(4)]
    assert shutdown_within(executor), "shutdown(wait=True) hung with calls queued (gh-115634)"
    assert len({f.result(timeout=WAIT) for f in futures}) == 4


@also_drop_in
def test_map_chunksize_one_is_one_call_per_item(make: Callable[..., cf.Executor]) -> None:
    executor = make(max_workers=2, max_tasks_per_child=1)
    assert len(set(executor.map(_tasks.pid_of, range(4)))) == 4


@pytest.mark.parametrize("kind", CONSTRUCTORS)
def test_max_tasks_per_child_below_one_is_a_value_error(kind: str) -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        build(kind, 1, max_tasks_per_child=0)


@pytest.mark.parametrize("kind", CONSTRUCTORS)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_mp_context_is_accepted(kind: str, method: str) -> None:
    executor = build(kind, 1, mp_context=multiprocessing.get_context(method))
    try:
        assert executor.submit(_tasks.double, 5).result(timeout=WAIT) == 10
    finally:
        executor.shutdown()


@pytest.mark.parametrize("kind", CONSTRUCTORS)
@difference("fresh-workers")
def test_workers_and_the_parents_state_under_fork(kind: str) -> None:
    _tasks._INIT_VALUE.append(7)  # state this process made, after importing the module
    try:
        with warnings.catch_warnings():  # 3.12+: fork in a multi-threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            executor = build(kind, 1, mp_context=multiprocessing.get_context("fork"))
            try:
                seen = executor.submit(_tasks.read_init, None).result(timeout=WAIT)
            finally:
                executor.shutdown()
    finally:
        _tasks._INIT_VALUE.remove(7)
    assert seen == ([7] if kind == "stdlib" else [])  # stagepool: a fresh interpreter


# ---- interpreter exit -----------------------------------------------------------------------------

EXIT_SCRIPT = """
import concurrent.futures, sys
sys.path[:0] = [{src!r}, {tests!r}]
import stagepool as sp, _tasks

if __name__ == "__main__":
    executor = {make}
    executor.submit(_tasks.sleep_then_touch, {path!r}, 0.5)
    {stop}
"""
MAKERS = {"stdlib": "concurrent.futures.ProcessPoolExecutor(1)",
          "drop-in": "sp.ProcessPoolExecutor(1)",
          "engine-view": "sp.Engine(workers=1).executor"}


def run_exit_script(kind: str, stop: str, path: Path) -> None:
    code = EXIT_SCRIPT.format(src=str(Path(sp.__file__).parent.parent),
                              tests=str(Path(__file__).parent), make=MAKERS[kind], stop=stop,
                              path=str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0, done.stderr


@also_drop_in
def test_calls_left_running_after_shutdown_without_waiting_finish_at_exit(
        kind: str, tmp_path: Path) -> None:
    run_exit_script(kind, "executor.shutdown(wait=False)", tmp_path / "ran")
    assert (tmp_path / "ran").exists()


@also_drop_in
@difference("engine-left-open")
def test_calls_left_running_in_an_executor_never_shut_down(kind: str, tmp_path: Path) -> None:
    run_exit_script(kind, "pass", tmp_path / "ran")
    # The engine view belongs to an Engine nobody shut down: killed, so it cannot hang the exit.
    assert (tmp_path / "ran").exists() == (kind != "engine-view")


# ---- the documentation of the differences ---------------------------------------------------------

def test_every_deliberate_difference_is_in_the_readme() -> None:
    text = README.read_text()
    section = text[text.index("## Drop-in for concurrent.futures"):]
    for key, words in DIFFERENCES.items():
        assert words in section, f"the README does not explain the difference {key!r}"
