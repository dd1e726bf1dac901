"""The crash table: every way a task can misbehave, on real workers, and what the caller sees.

Each row checks the central promise: one outcome per item, only the guilty item fails (with the
expected kind and a message that says why), the engine keeps serving with its full worker count,
and nothing is left behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import _tasks
import stagepool as sp
from conftest import WAIT, shm_entries, stagepool_workers, wait_until
from stagepool._backends._local import _crew

N = 12
GUILTY = 5  # the item that misbehaves: its value is 0, every other item's value is its index + 1


def items() -> list[int]:
    return [0 if i == GUILTY else i + 1 for i in range(N)]


@pytest.fixture(scope="module")
def fault_engine() -> Iterator[sp.Engine]:
    with sp.Engine(workers=2, timeout=2.0, chunk_size=4) as eng:
        yield eng


# fn, expected kind, error type, words the message must contain
CRASH_TABLE: list[tuple[Callable[[int], int], str, type[BaseException], tuple[str, ...]]] = [
    (_tasks.segfault, "crash", sp.WorkerCrashed, ("SIGSEGV", f"item {GUILTY}", "segmentation")),
    (_tasks.hard_exit, "crash", sp.WorkerCrashed, ("exited with code 3", f"item {GUILTY}")),
    (_tasks.sigkill_self, "crash", sp.WorkerCrashed, ("SIGKILL", "OOM killer", f"item {GUILTY}")),
    (_tasks.sigterm_self, "crash", sp.WorkerCrashed, ("SIGTERM", f"item {GUILTY}")),
    (_tasks.hang_sleep, "timeout", sp.TaskTimeout, (f"item {GUILTY}", "timeout of 2 s")),
    (_tasks.hang_loop, "timeout", sp.TaskTimeout, (f"item {GUILTY}", "killed")),
    (_tasks.hang_ignoring_sigterm, "timeout", sp.TaskTimeout, (f"item {GUILTY}",)),
    (_tasks.hang_in_c, "timeout", sp.TaskTimeout, (f"item {GUILTY}",)),
    (_tasks.raise_timeout_error, "error", TimeoutError, ("the task's own timeout",)),
]


@pytest.mark.parametrize(("fn", "kind", "error_type", "words"), CRASH_TABLE,
                         ids=[row[0].__name__ for row in CRASH_TABLE])
def test_crash_table(fault_engine: sp.Engine, fn: Callable[[int], int], kind: str,
                     error_type: type[BaseException], words: tuple[str, ...]) -> None:
    shm_before = shm_entries()
    started = time.monotonic()
    report = fault_engine.map(fn, items())
    assert time.monotonic() - started < WAIT
    assert len(report) == N
    assert [o.index for o in report] == list(range(N))
    guilty = report[GUILTY]
    assert guilty.kind == kind, guilty
    assert isinstance(guilty.error, error_type), repr(guilty.error)
    for word in words:
        assert word in str(guilty.error), (word, str(guilty.error))
    innocent = [o for o in report if o.index != GUILTY]
    assert all(o.ok for o in innocent), [o for o in innocent if not o.ok]
    assert [o.value for o in innocent] == [i + 1 for i in range(N) if i != GUILTY]
    # the engine still serves, at full strength, and nothing leaked
    assert fault_engine.map(_tasks.double, range(20)).values == [2 * i for i in range(20)]
    assert wait_until(lambda: len(fault_engine.worker_pids()) == 2)
    assert wait_until(lambda: stagepool_workers() >= set(fault_engine.worker_pids()))
    assert shm_entries() <= shm_before


def test_crash_report_carries_the_workers_stderr_tail(fault_engine: sp.Engine) -> None:
    def noisy_exit(x: int) -> int:
        import sys

        print(f"decoder: corrupt NAL unit in segment {x}", file=sys.stderr, flush=True)
        os._exit(4)

    report = fault_engine.map(noisy_exit, [77])
    message = str(report[0].error)
    assert report[0].kind == "crash"
    assert "exited with code 4" in message and "corrupt NAL unit in segment 77" in message


def test_segfault_report_carries_the_faulthandler_dump(fault_engine: sp.Engine) -> None:
    report = fault_engine.map(_tasks.segfault, [0])
    message = str(report[0].error)
    assert "Fatal Python error: Segmentation fault" in message
    assert "in segfault" in message  # the worker's Python stack at the crash


def test_crash_in_last_item_and_consecutive_chunks(fault_engine: sp.Engine) -> None:
    values = [1, 2, 0, 4, 0, 6, 7, 0]  # crashes in consecutive chunks, and the last item
    report = fault_engine.map(_tasks.hard_exit, values)
    assert [o.kind for o in report] == ["ok", "ok", "crash", "ok", "crash", "ok", "ok", "crash"]


def test_every_item_crashing(fault_engine: sp.Engine) -> None:
    report = fault_engine.map(_tasks.hard_exit, [0] * 6)
    assert [o.kind for o in report] == ["crash"] * 6
    assert fault_engine.map(_tasks.double, [4]).values == [8]


def test_a_result_whose_finalizer_ends_the_worker_after_answering_is_ok_once() -> None:
    """The worker lets go of a chunk's results once its answer is sent: each value arrives,
    ran once, and the worker's death after it loses and blames nothing. Before, the results
    were freed before answering: the answer never left, and every item read "crash" with
    attempts 0 after the chunks had been halved down to single items."""
    with sp.Engine(workers=2) as engine:
        before = set(engine.worker_pids())
        report = engine.map(_tasks.dies_when_freed, range(40), timeout=30)
        assert [(o.kind, o.attempts) for o in report] == [("ok", 1)] * 40
        assert [v.value for v in report.values] == list(range(40))
        assert engine.map(_tasks.double, [4]).values == [8]  # replaced, still serving
        assert before - set(engine.worker_pids())  # workers did die after answering


def test_a_result_whose_finalizer_forks_after_answering_runs_each_item_once(
        tmp_path: Path) -> None:
    """The results are let go of after the answer: a finalizer that forks there must not leave
    a second reader on the worker's pipe. Before, the forked child took the next task off the
    pipe, ran it (its side effects twice when re-sent) and left without answering: the item
    was blamed for a timeout, or without one the batch waited forever."""
    runs = tmp_path / "runs"
    with sp.Engine(workers=2, timeout=5) as engine:
        report = engine.map(_tasks.forks_when_freed, [(i, str(runs)) for i in range(12)],
                            chunk_size=1)
        assert [(o.kind, o.attempts) for o in report] == [("ok", 1)] * 12
        assert sorted(int(line) for line in runs.read_text().split()) == list(range(12))
        assert engine.map(_tasks.double, [4], timeout=10).values == [8]


@pytest.mark.timeout(60)
def test_a_finalizer_that_hangs_after_answering_holds_up_no_later_chunk() -> None:
    """A result's finalizer that hangs once the answer is sent blames no item, and the chunk
    sent to that worker next (here the next batch's) does not wait for it past its timeout:
    the worker is replaced and the chunk runs elsewhere, its attempt uncounted. Before, the
    chunk waited for ever, whatever the timeout (the worker never named it in the record)."""
    with sp.Engine(workers=2) as engine:
        first = engine.map(_tasks.hangs_when_freed, [(i, i == 3) for i in range(4)],
                           chunk_size=1, timeout=2)
        assert [(o.kind, o.attempts) for o in first] == [("ok", 1)] * 4
        report = engine.map(_tasks.double, range(8), chunk_size=1, timeout=2)
        assert [(o.kind, o.attempts, o.value) for o in report] == [
            ("ok", 1, 2 * i) for i in range(8)]
        assert len(engine.worker_pids()) == 2


@pytest.mark.timeout(60)
def test_a_result_whose_pickling_hangs_times_out_alone() -> None:
    """Pickling the answer is timed too: the item whose result hangs there reads timeout, the
    others of its chunk come back ok. Before, the chunk waited for ever, whatever the timeout:
    the record no longer named an item, and a chunk past its items had no deadline."""
    with sp.Engine(workers=2) as engine:
        report = engine.map(_tasks.hangs_when_pickled_on, range(4), chunk_size=2, timeout=2)
        assert [o.kind for o in report] == ["ok", "timeout", "ok", "ok"]
        assert [o.value for o in report if o.ok] == [0, 2, 3]
        assert engine.map(_tasks.double, [4], timeout=10).values == [8]


def test_crash_and_timeout_in_one_batch(fault_engine: sp.Engine) -> None:
    def misbehave(x: int) -> int:
        if x == -1:
            os._exit(9)
        if x == -2:
            time.sleep(10**6)
        return x

    report = fault_engine.map(misbehave, [1, -1, 2, 3, -2, 4, 5])
    assert [o.kind for o in report] == ["ok", "crash", "ok", "ok", "timeout", "ok", "ok"]
    assert report.values == [1, 2, 3, 4, 5]


def test_a_timeout_on_tiny_items_blames_the_hung_one() -> None:
    """Tiny items under a numeric timeout run without per-item clock reads (the pool thread
    watches their offsets instead: _limits.sampled_deadline); a hang among them is still found
    exactly, and every other item gets its value."""
    n, guilty, limit = 20_000, 15_000, 1.0
    with sp.Engine(workers=2, timeout=limit) as eng:
        started = time.monotonic()
        report = eng.map(_tasks.hang_on_zero_loop, [0 if i == guilty else i + 1 for i in range(n)])
        assert time.monotonic() - started < WAIT
        assert [o.index for o in report.failed] == [guilty]
        assert report[guilty].kind == "timeout"
        assert f"item {guilty} ran longer than its timeout of 1 s" in str(report[guilty].error)
        assert report.values == [2 * (i + 1) for i in range(n) if i != guilty]
        assert eng.map(_tasks.double, [1, 2]).values == [2, 4]


@pytest.fixture
def late_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kill lands 0.5 s after its verdict (a thread sends it: on a loaded machine,
    milliseconds later), so that an overrunning item may end before it."""
    stop = _crew._stop

    def late_stop(pid: int, grace: float, dump_stack: bool) -> None:
        time.sleep(0.5)
        stop(pid, grace, dump_stack)

    monkeypatch.setattr(_crew, "_stop", late_stop)


@pytest.mark.usefixtures("late_kill")
def test_an_item_that_ends_after_its_timeout_verdict_blames_nothing_in_the_next_chunk(
        tmp_path: Path) -> None:
    """A worker's kill comes a moment after its item's timeout verdict (a thread sends it: on
    a loaded machine milliseconds later, here 0.5 s so that the race is certain). Chunks of 2
    on one worker (the first teach the cost; the next chunk is then prefetched while item 12
    runs): item 13 (the last of its chunk) overruns its 0.2 s limit but ends before the kill,
    its chunk answers, and the worker starts the chunk it already held (item 14): the kill
    lands there. The verdict's offset (1) is not of that chunk: it used to blame offset 1 of
    it, an IndexError out of map() here (in a longer chunk, an innocent item's "timeout";
    seen with tiny items under timeout=0.005). Now nothing in that chunk is to blame: item
    14 runs again, and its attempts say so."""
    def nap(index: int) -> int:
        if index >= 12:  # the first ones stay tiny: their chunks' cost says "prefetch"
            with open(tmp_path / str(index), "a") as log:
                log.write(".")
            time.sleep({12: 0.3, 13: 0.5, 14: 1.0}[index])
        return index

    with sp.Engine(workers=1, chunk_size=2) as eng:
        report = eng.map(nap, range(15), timeout=lambda i: 0.2 if i == 13 else WAIT)
        assert [o.kind for o in report] == ["ok"] * 15, report.summary()
        runs = [len((tmp_path / str(i)).read_text()) for i in range(12, 15)]
        assert [o.attempts for o in report] == [1] * 12 + runs == [1] * 14 + [2]
        assert eng.map(_tasks.double, [1, 2]).values == [2, 4]


@pytest.mark.usefixtures("late_kill")
def test_items_run_after_a_timeout_verdict_count_in_attempts(tmp_path: Path) -> None:
    """The same late kill inside one chunk: item 1 overruns its 0.2 s limit and ends before
    the kill, the worker runs item 2 and starts item 3, then dies. Item 1 keeps the blame
    (it overran); items 2 and 3 ran, so their runs count: their attempts said 1 where they
    ran twice (with tiny items, thousands can run in that gap)."""
    def nap(index: int) -> int:
        with open(tmp_path / str(index), "a") as log:
            log.write(".")
        time.sleep({1: 0.5, 3: 1.0}.get(index, 0.0))
        return index

    with sp.Engine(workers=1, chunk_size=4) as eng:
        report = eng.map(nap, range(4), timeout=lambda i: 0.2 if i == 1 else WAIT)
        assert [o.kind for o in report] == ["ok", "timeout", "ok", "ok"], report.summary()
        runs = [len((tmp_path / str(i)).read_text()) for i in range(4)]
        assert [o.attempts for o in report] == runs == [2, 1, 2, 2]


def test_timeout_kills_the_tasks_children(fault_engine: sp.Engine, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    child_file = tmp_path / "child.pid"
    monkeypatch.setenv("STAGEPOOL_TEST_CHILD_FILE", str(child_file))
    with sp.Engine(workers=1, timeout=1.5) as eng:
        report = eng.map(_tasks.hang_with_child, [1, 0, 2])
        assert [o.kind for o in report] == ["ok", "timeout", "ok"]
    child = int(child_file.read_text())
    assert wait_until(lambda: not psutil.pid_exists(child) or
                      psutil.Process(child).status() == psutil.STATUS_ZOMBIE, timeout=10)


def test_timeout_as_callable_of_the_item(fault_engine: sp.Engine) -> None:
    report = fault_engine.map(_tasks.sleep_for, [0.05, 1.5, 0.05],
                              timeout=lambda seconds: 0.5 if seconds > 1 else 5)
    assert [o.kind for o in report] == ["ok", "timeout", "ok"]
    assert "timeout of 0.5 s" in str(report[1].error)


def test_retries_count_attempts_and_never_duplicate(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"

    def flaky(x: int) -> int:
        if x == 3 and not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return x

    # One item per chunk: an item that ran in the crashed item's chunk before it would run
    # again (its result died with the worker), and count 2 attempts, honestly.
    with sp.Engine(workers=2, retries=2, retry_on=("crash",), chunk_size=1) as eng:
        report = eng.map(flaky, range(8))
    assert report.values == list(range(8)) and len(report) == 8
    assert report[3].attempts == 2 and report[2].attempts == 1
    assert report.stats.retries == 1


def test_retry_on_exception_type_gives_up_after_n(engine: sp.Engine) -> None:
    with sp.Engine(workers=1, retries=2, retry_on=(ValueError,)) as eng:
        report = eng.map(_tasks.fail_on, [(1, True), (2, False)])
    assert report[0].kind == "error" and report[0].attempts == 3
    assert report[1].ok and report[1].attempts == 1


def test_submit_reports_a_crash(fault_engine: sp.Engine) -> None:
    future = fault_engine.submit(_tasks.hard_exit, 0)
    with pytest.raises(sp.WorkerCrashed, match="exited with code 3"):
        future.result(timeout=WAIT)
    assert fault_engine.submit(_tasks.double, 21).result(timeout=WAIT) == 42


def test_shutdown_kill_finishes_fast_with_hung_tasks() -> None:
    eng = sp.Engine(workers=2)
    futures = [eng.submit(_tasks.hang_sleep, 0) for _ in range(4)]
    time.sleep(0.5)
    pids = eng.worker_pids()
    started = time.monotonic()
    eng.shutdown(kill=True)
    assert time.monotonic() - started < 5
    for future in futures:
        assert future.done()
    assert wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                      != psutil.STATUS_ZOMBIE for p in pids), timeout=10)


def test_shutdown_cancel_futures_gives_cancelled_outcomes() -> None:
    eng = sp.Engine(workers=1, chunk_size=1)
    import threading

    result: list[sp.BatchReport[float]] = []
    runner = threading.Thread(target=lambda: result.append(eng.map(_tasks.sleep_for, [0.3] * 20)))
    runner.start()
    time.sleep(0.5)
    eng.shutdown(wait=True, cancel_futures=True)
    runner.join(WAIT)
    assert not runner.is_alive()
    report = result[0]
    assert len(report) == 20
    kinds = {o.kind for o in report}
    assert kinds <= {"ok", "cancelled"} and "cancelled" in kinds
    assert report[0].ok


def test_memory_guard_recycles_a_growing_worker() -> None:
    def grow(x: int) -> int:
        global _hoard
        try:
            _hoard.append(bytearray(40 * 2**20))
        except NameError:
            _hoard = [bytearray(40 * 2**20)]
        for block in _hoard:
            block[::4096] = b"x" * len(block[::4096])
        return os.getpid()

    with sp.Engine(workers=1, chunk_size=1, max_rss_per_worker="150MiB") as eng:
        pids = eng.map(grow, range(12)).values
    assert len(set(pids)) >= 2  # the worker was replaced at least once


def test_a_memory_cap_below_a_fresh_worker_still_gives_every_item_an_outcome() -> None:
    # A fresh worker already holds more than 2 x 4 MiB. It used to be killed while starting,
    # before its chunk began; that death was no item's and no start-up failure either, so the
    # chunk was requeued onto a fresh worker, killed the same way, forever: map never returned.
    done: list[sp.BatchReport[int]] = []
    with sp.Engine(workers=1, chunk_size=1, max_rss_per_worker="4MiB") as eng:
        runner = threading.Thread(target=lambda: done.append(eng.map(_tasks.double, range(3))),
                                  daemon=True)
        runner.start()
        runner.join(WAIT)
        assert done, "map did not return"
        report = done[0]
        assert [o.value for o in report if o.ok] == [2 * o.index for o in report if o.ok]
        for failed in report.failed:  # killed while running: its item's own outcome, and why
            assert failed.kind == "crash" and "max_rss_per_worker" in str(failed.error)
        assert eng.submit(_tasks.double, 5).result(timeout=WAIT) == 10


def test_max_tasks_per_worker_recycles() -> None:
    with sp.Engine(workers=1, chunk_size=1, max_tasks_per_worker=3) as eng:
        pids = eng.map(_tasks.pid_of, range(9)).values
    assert len(set(pids)) == 3


@pytest.mark.parametrize("source", ["list", "iterator", "imap"])
def test_max_tasks_per_worker_counts_items_with_automatic_chunks(source: str) -> None:
    """Recycling "a worker that ran that many items" holds when the engine sizes the chunks: a
    planned or adaptive chunk of tiny items carried dozens of them into a worker allowed 2
    (issue 15 attack: 38 items in one worker with max_tasks_per_worker=1)."""
    with sp.Engine(workers=2, max_tasks_per_worker=2) as eng:
        items = range(30)
        if source == "imap":
            pids = [o.value for o in eng.imap(_tasks.pid_of, list(items))]
        else:
            pids = eng.map(_tasks.pid_of, list(items) if source == "list" else iter(items)).values
    assert max(pids.count(pid) for pid in set(pids)) <= 2


def test_a_worker_slow_to_exit_does_not_stall_the_others(tmp_path: Path) -> None:
    # Recycled after its one item, the first worker then spends 10 s in an atexit hook. The pool
    # must go on feeding the other workers meanwhile (it used to wait up to 5 s for the exit,
    # feeding nobody), and still collect the slow one in the end: killed at the stop deadline
    # (5 s after it was told to go), no orphan. One item served by the worker already up while
    # the slow one is still there proves the first; a whole map of fresh workers (each a
    # respawn) could take longer than 5 s on a loaded machine, so it comes after.
    pid_file = tmp_path / "pid"
    with sp.Engine(workers=2, chunk_size=1, max_tasks_per_worker=1) as eng:
        first = eng.submit(_tasks.exit_slowly, str(pid_file)).result(timeout=WAIT)
        assert wait_until(lambda: first not in eng.worker_pids())  # recycled: a new one serves
        assert eng.submit(_tasks.double, 4).result(timeout=WAIT) == 8

        def still_leaving() -> bool:
            return psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE

        assert still_leaving()  # served while the slow worker had not gone (nor been killed)
        report = eng.map(_tasks.double, range(6))
        assert report.values == [2 * i for i in range(6)]
        assert wait_until(lambda: not still_leaving(), timeout=WAIT)


def test_an_item_that_allocates_far_past_the_cap_fails_alone() -> None:
    def allocate(gib: int) -> int:
        block = bytearray(gib * 2**30)  # private memory far beyond 2 x max_rss + headroom
        return len(block)

    with sp.Engine(workers=1, max_rss_per_worker="200MiB") as eng:
        report = eng.map(allocate, [0, 4, 0])
        assert [o.kind for o in report] == ["ok", "error", "ok"]
        assert isinstance(report[1].error, MemoryError)
        assert eng.map(_tasks.double, [5]).values == [10]


def test_several_workers_dying_at_once(fault_engine: sp.Engine) -> None:
    def die_together(x: int) -> int:
        if x < 0:  # both workers reach their guilty item at about the same moment
            time.sleep(0.3)
            os._exit(7)
        return x

    report = fault_engine.map(die_together, [-1, -2, 1, 2, 3, 4], chunk_size=1)
    assert [o.kind for o in report] == ["crash", "crash", "ok", "ok", "ok", "ok"]
    assert {o.worker for o in report[:2]} and report[0].worker != report[1].worker
    assert wait_until(lambda: len(fault_engine.worker_pids()) == 2)


def test_submit_reports_a_timeout_with_its_limit(fault_engine: sp.Engine) -> None:
    future = fault_engine.submit(_tasks.hang_sleep, 0)  # fault_engine: timeout=2.0
    with pytest.raises(sp.TaskTimeout, match="timeout of 2 s"):
        future.result(timeout=WAIT)
    assert fault_engine.submit(_tasks.double, 4).result(timeout=WAIT) == 8
    assert wait_until(lambda: len(fault_engine.worker_pids()) == 2)


def test_calls_that_kill_fresh_workers_do_not_fail_the_innocent_queued_behind_them() -> None:
    # Three workers in a row killed by their first call used to count as "workers keep dying at
    # start-up": the queue was failed wholesale, the innocent call included.
    with sp.Engine(workers=1) as eng:
        crashing = [eng.submit(_tasks.hard_exit, 0) for _ in range(3)]
        innocent = eng.submit(_tasks.double, 21)
        assert all(isinstance(f.exception(timeout=WAIT), sp.WorkerCrashed) for f in crashing)
        assert innocent.result(timeout=WAIT) == 42


def test_workers_dying_at_start_up_fail_the_queue_instead_of_respawning_forever() -> None:
    with sp.Engine(workers=1, initializer=_tasks.hard_exit, initargs=(0,)) as eng:
        error = eng.submit(_tasks.double, 1).exception(timeout=WAIT)
        assert isinstance(error, sp.WorkerCrashed)  # named precisely: it died in the initializer
        assert "while running the initializer _tasks.hard_exit" in str(error)
        assert "no worker is started again" in str(error)
