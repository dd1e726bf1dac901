"""The dask backend on a real cluster on 127.0.0.1: ``dask scheduler`` and two ``dask worker``
processes started here (their nannies restart a worker that dies), and what only a cluster can
do to a batch: lose a worker in the middle of it.

The shared suite (conftest's ``engine`` fixture) runs everything else on the dask backend too,
on an in-process ``LocalCluster``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import _profile_tasks
import _tasks
import stagepool as sp
from conftest import WAIT, shm_entries, wait_until

distributed = pytest.importorskip("distributed")

N = 12
GUILTY = 5
TESTS = str(Path(__file__).parent)


def items() -> list[int]:
    return [0 if i == GUILTY else i + 1 for i in range(N)]


# ---- a cluster of real processes --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(*args: str) -> subprocess.Popen[bytes]:
    """A ``dask`` command in a session of its own, so that stopping it reaches every process it
    started (nanny, worker, lanes); the workers import the tests' task module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "dask", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _session_members(sessions: set[int]) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) in sessions and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every session (workers first), SIGKILL what is left after 10 s; then nothing of
    them may run, lanes and resource trackers included."""
    sessions = {proc.pid for proc in procs}
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_members(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(timeout=WAIT)
    assert wait_until(lambda: not _session_members(sessions), timeout=10), (
        f"left running: {_session_members(sessions)}")


def _start_worker(address: str, *options: str) -> subprocess.Popen[bytes]:
    return _start("worker", address, "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard",
                  "--death-timeout", "30", *options)


@contextlib.contextmanager
def _real_cluster(*workers: tuple[str, ...]) -> Iterator[str]:
    """``dask scheduler`` on a free port and one ``dask worker`` per entry of ``workers`` (its
    options); yields the address once every worker serves, and stops them all after."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")]
    try:
        procs += [_start_worker(address, *options) for options in workers]
        with distributed.Client(address, timeout=WAIT, set_as_default=False) as client:
            client.wait_for_workers(len(workers), timeout=WAIT)
        yield address
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """``dask scheduler`` + 2 x ``dask worker --nworkers 1 --nthreads 1``, on free ports."""
    with _real_cluster(("--nthreads", "1"), ("--nthreads", "1")) as address:
        yield address


@pytest.fixture(scope="module")
def client(cluster: str) -> Iterator[Any]:
    with distributed.Client(cluster, timeout=WAIT, set_as_default=False) as c:
        yield c


@pytest.fixture
def cli_engine(cluster: str, client: Any) -> Iterator[sp.Engine]:
    """An engine on the cluster, once both workers serve (a test before may have killed one)."""
    client.wait_for_workers(2, timeout=WAIT)
    with sp.Engine(backend="dask", address=cluster, chunk_size=4) as eng:
        yield eng


def _dask_worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid).values())


# ---- a worker lost in the middle of a batch ---------------------------------------------------

def test_an_item_that_kills_its_dask_worker_fails_alone(cli_engine: sp.Engine) -> None:
    report = cli_engine.map(_tasks.kill_dask_worker, items())
    assert [o.index for o in report] == list(range(N))
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1)
    assert report.values == [i + 1 for i in range(N) if i != GUILTY]
    error = str(report[GUILTY].error)
    assert f"item {GUILTY}" in error and "dask worker tcp://127.0.0.1:" in error
    assert cli_engine.map(_tasks.double, range(6)).values == [0, 2, 4, 6, 8, 10]


def test_a_dask_worker_sigkilled_mid_batch_fails_only_the_item_it_was_running(
        cli_engine: sp.Engine, tmp_path: Path) -> None:
    """One chunk per worker thread: the other items of the batch were queued by us, not by the
    dying worker, so they run elsewhere instead of being blamed."""
    work = [(i, 8.0 if i == GUILTY else 0.2, str(tmp_path)) for i in range(N)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(cli_engine.map, _tasks.note_then_sleep, work, chunk_size=1)
        started = tmp_path / str(GUILTY)
        assert wait_until(started.exists, timeout=WAIT)
        os.kill(int(started.read_text()), signal.SIGKILL)  # the dask worker running it
        report = running.result(timeout=WAIT)
    assert [o.index for o in report] == list(range(N))
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1)
    assert report.values == [i for i in range(N) if i != GUILTY]
    # its pid is not known here: the message names the worker by address, not as "worker 0"
    assert str(report[GUILTY].error).startswith("the dask worker tcp://127.0.0.1:")


def test_a_dask_worker_sigkilled_on_a_chunk_of_big_arrays_fails_only_its_running_item(
        cli_engine: sp.Engine, tmp_path: Path) -> None:
    """The chunks' big arrays were scattered to the killed worker and died with it: dask then
    cancels the chunks that depended on them ("already forgotten"), usually before the engine's
    membership poll sees the worker gone. That is the worker's loss, not a client's cancel: the
    running item is blamed, the others run elsewhere, and none is reported cancelled."""
    import numpy as np

    import _dask_array_tasks

    big = np.ones((2 << 20) // 8)  # past the frame and scatter thresholds
    work = [(i, 8.0 if i == GUILTY else 0.2, str(tmp_path), big) for i in range(N)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(cli_engine.map, _dask_array_tasks.note_then_sleep_with_array, work,
                              chunk_size=1)
        started = tmp_path / str(GUILTY)
        assert wait_until(started.exists, timeout=WAIT)
        os.kill(int(started.read_text()), signal.SIGKILL)  # the dask worker running it
        report = running.result(timeout=2 * WAIT)
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1), \
        [(o.index, o.kind, str(o.error)) for o in report if not o.ok]
    assert report.values == [i for i in range(N) if i != GUILTY]


def test_a_dying_in_process_worker_blames_only_its_running_item() -> None:
    """The in-process cluster fails a dead worker's tasks at once (KilledWorker, allowed-failures
    0), the chunk waiting in that worker's queue too: that one runs elsewhere, unblamed."""
    with sp.Engine(backend="dask", workers=2) as eng:
        report = eng.map(_tasks.kill_dask_worker_midway, items(), chunk_size=1)
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1)
    assert all(o.attempts == 1 for o in report)


def test_a_chunk_waiting_behind_a_running_one_on_a_killed_worker_runs_again_uncharged(
        cli_engine: sp.Engine, client: Any, tmp_path: Path) -> None:
    """One chunk waits ahead in each worker's queue: the one behind the running guilty item had
    not started when its worker was killed, so it runs elsewhere, ok, charged nothing. (Enough
    items that the other worker fills up, running one and holding one, while the guilty one runs:
    the next goes to wait behind the guilty one.)"""
    n = 4 * N
    work = [(i, 8.0 if i == GUILTY else 0.2, str(tmp_path)) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(cli_engine.map, _tasks.note_then_sleep, work, chunk_size=1)
        started = tmp_path / str(GUILTY)
        assert wait_until(started.exists, timeout=WAIT)
        pid = int(started.read_text())
        (address,) = [a for a, p in client.run(os.getpid).items() if p == pid]
        # the chunk after the guilty one is sent there ahead, to wait for the guilty one's end
        assert wait_until(lambda: sum(s.busy and s.worker == address
                                      for s in cli_engine.status()) == 2, timeout=WAIT)
        os.kill(pid, signal.SIGKILL)
        report = running.result(timeout=WAIT)
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (n - GUILTY - 1)
    assert all(o.attempts == 1 for o in report), [o.attempts for o in report]


def test_an_item_sent_ahead_that_kills_its_worker_at_once_fails_alone(
        cli_engine: sp.Engine) -> None:
    """Single-item chunks, one waiting ahead on each worker: the guilty item starts the moment
    the one before it ends and kills its worker before dask has told the engine that that one
    finished (the report window). The worker recorded the end with the scheduler before
    starting the next chunk, so the one before is not blamed in its place."""
    report = cli_engine.map(_tasks.kill_dask_worker, items(), chunk_size=1)
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1)
    assert report.values == [i + 1 for i in range(N) if i != GUILTY]


# ---- a chunk that ended, whose result died with its worker --------------------------------------

HOLD_PLUGIN = "test-hold-first-result"


@contextlib.contextmanager
def _first_result_held(client: Any, folder: Path) -> Iterator[Path]:
    """The first chunk result fetched from a worker is held there (``_dask_hooks``); yields the
    file that names that worker's pid once it is held."""
    import _dask_hooks  # imports distributed: only once the module knows it is installed

    (folder / "armed").touch()
    client.register_plugin(_dask_hooks.HoldFirstResult(str(folder)), name=HOLD_PLUGIN)
    try:
        yield folder / "held"
    finally:
        client.unregister_worker_plugin(HOLD_PLUGIN)


def _runs(logs: Path, n: int) -> list[int]:
    """How often each of ``n`` ``_tasks.logged`` items really ran."""
    return [len((logs / str(i)).read_text()) if (logs / str(i)).exists() else 0 for i in range(n)]


@pytest.mark.parametrize("rerun_innocent", [True, False])
def test_a_result_lost_with_its_worker_after_its_chunk_ended_counts_the_run(
        cluster: str, client: Any, tmp_path: Path, rerun_innocent: bool) -> None:
    """Two chunks of four, one per worker. One ends (recorded with the scheduler) and its worker
    is SIGKILLed while its result is fetched: its four items ran, none is guilty. Re-run, that
    run is charged (``attempts`` 2); with rerun_innocent=False they do not run again and say
    their result was lost with that dask worker."""
    client.wait_for_workers(2, timeout=WAIT)
    logs = tmp_path / "runs"
    logs.mkdir()
    work = [(i, "ok", str(logs)) for i in range(8)]
    with _first_result_held(client, tmp_path) as held, \
            sp.Engine(backend="dask", address=cluster, chunk_size=4,
                      rerun_innocent=rerun_innocent) as eng, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(eng.map, _tasks.logged, work)
        assert wait_until(held.exists, timeout=WAIT)
        os.kill(int(held.read_text()), signal.SIGKILL)
        report = running.result(timeout=WAIT)
    runs = _runs(logs, 8)
    assert [o.attempts for o in report] == runs, report.summary()
    lost = [o for o in report if not o.ok]
    if rerun_innocent:
        assert report.values == list(range(8)) and sorted(runs) == [1] * 4 + [2] * 4
    else:
        assert runs == [1] * 8 and len(lost) == 4 and {o.kind for o in lost} == {"crash"}
        assert all("ran, but its result was lost" in str(o.error) and "dask worker tcp://"
                   in str(o.error) and "rerun_innocent=False" in str(o.error) for o in lost)


@pytest.mark.parametrize("rerun_innocent", [True, False])
def test_a_single_call_whose_result_died_with_its_worker_runs_again_only_if_allowed(
        cluster: str, client: Any, tmp_path: Path, rerun_innocent: bool) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    logs = tmp_path / "runs"
    logs.mkdir()
    with _first_result_held(client, tmp_path) as held, \
            sp.Engine(backend="dask", address=cluster, rerun_innocent=rerun_innocent) as eng:
        future = eng.submit(_tasks.logged, (0, "ok", str(logs)))
        assert wait_until(held.exists, timeout=WAIT)
        os.kill(int(held.read_text()), signal.SIGKILL)
        if rerun_innocent:
            assert future.result(timeout=WAIT) == 0
        else:
            with pytest.raises(sp.WorkerCrashed, match=r"ran, but its result was lost .*dask "
                                                       r"worker tcp://.*rerun_innocent=False"):
                future.result(timeout=WAIT)
    assert _runs(logs, 1) == [2 if rerun_innocent else 1]


def test_a_segfault_fails_its_item_and_the_dask_worker_lives_on(
        cli_engine: sp.Engine, client: Any) -> None:
    before = _dask_worker_pids(client)
    report = cli_engine.map(_tasks.segfault, items())
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["crash"] + ["ok"] * (N - GUILTY - 1)
    error = str(report[GUILTY].error)
    assert "SIGSEGV" in error and f"item {GUILTY}" in error and "dask worker tcp://" in error
    assert _dask_worker_pids(client) == before  # only a lane died, and it was replaced


def test_a_hung_item_times_out_and_its_child_process_is_killed(
        cli_engine: sp.Engine, tmp_path: Path) -> None:
    child_file = tmp_path / "child.pid"
    work = [(value, str(child_file)) for value in items()]
    report = cli_engine.map(_tasks.hang_with_child_noting, work, timeout=1.5)
    assert [o.kind for o in report] == ["ok"] * GUILTY + ["timeout"] + ["ok"] * (N - GUILTY - 1)
    assert "dask worker tcp://" in str(report[GUILTY].error)
    child = int(child_file.read_text())
    assert wait_until(lambda: not psutil.pid_exists(child) or
                      psutil.Process(child).status() == psutil.STATUS_ZOMBIE, timeout=10)


def test_initializer_and_memory_cap_reach_the_lanes_on_the_workers(cluster: str, client: Any) -> None:
    def allocate(gib: int) -> int:
        return len(bytearray(gib * 2**30))  # far beyond 2 x max_rss + headroom

    client.wait_for_workers(2, timeout=WAIT)
    with sp.Engine(backend="dask", address=cluster, initializer=_tasks.init_set, initargs=(42,),
                   max_rss_per_worker="200MiB") as eng:
        assert eng.map(_tasks.read_init, range(4), chunk_size=1).values == [[42]] * 4
        report = eng.map(allocate, [0, 4, 0])
        assert [o.kind for o in report] == ["ok", "error", "ok"]
        assert isinstance(report[1].error, MemoryError)


# ---- connecting, and what an engine leaves behind -----------------------------------------------

def test_the_plan_and_repr_name_the_cluster(cli_engine: sp.Engine, cluster: str) -> None:
    assert cli_engine.workers == 2 and cli_engine.backend == "dask"
    assert cli_engine.plan.limited_by == "cluster" and cluster in cli_engine.plan.reason
    assert cluster in repr(cli_engine) and "2 workers x 1 thread" in repr(cli_engine)


def test_the_plan_follows_workers_that_join_and_leave(cli_engine: sp.Engine, cluster: str,
                                                      client: Any) -> None:
    """``engine.plan`` is the cluster as it is when read: it said 2 workers after one of two
    was retired, while the batch's summary said 1."""
    before = set(client.scheduler_info()["workers"])
    third = _start_worker(cluster, "--nthreads", "2")
    try:
        client.wait_for_workers(3, timeout=WAIT)
        (joined,) = set(client.scheduler_info()["workers"]) - before
        plan = cli_engine.plan
        assert plan.workers == 4 and plan.limited_by == "cluster", plan.reason
        assert plan.reason.startswith("4 workers: limited by cluster") and "3 workers" in plan.reason
        client.retire_workers([joined], close_workers=True)
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, WAIT)
        plan = cli_engine.plan
        assert plan.workers == 2 and "2 workers x 1 thread" in plan.reason, plan.reason
        assert cli_engine.map(_tasks.double, range(6)).values == [2 * i for i in range(6)]
    finally:
        _stop([third])


def test_a_worker_of_another_stagepool_version_is_named_and_sent_nothing(
        cli_engine: sp.Engine, cluster: str, client: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A worker of another version failed every chunk sent to it with "TypeError:
    HostPlugin.__init__() takes 4 positional arguments but 5 were given". One that joins is
    left out with a warning naming it and both versions; at ``Engine()`` it is an error."""
    before = set(client.scheduler_info()["workers"])
    monkeypatch.setenv("STAGEPOOL_TEST_VERSION", "0.0.1")
    other = _start_worker(cluster, "--nthreads", "1", "--preload", "_fake_version")
    try:
        client.wait_for_workers(3, timeout=WAIT)
        (joined,) = set(client.scheduler_info()["workers"]) - before
        other_pid = client.run(os.getpid, workers=[joined])[joined]
        with caplog.at_level(logging.WARNING, logger="stagepool"):
            work = [(i, 0.2, str(tmp_path)) for i in range(9)]
            report = cli_engine.map(_tasks.note_then_sleep, work, chunk_size=1)
        assert report.values == list(range(9)), report.summary()
        assert other_pid not in {int((tmp_path / str(i)).read_text()) for i in range(9)}
        (warned,) = [r.getMessage() for r in caplog.records if joined in r.getMessage()]
        assert f"runs stagepool 0.0.1, but this engine runs stagepool {sp.__version__}" in warned
        assert cli_engine.plan.workers == 2
        with pytest.raises(RuntimeError, match=f"{joined} runs stagepool 0.0.1, but this "
                                               f"engine runs stagepool {sp.__version__}"):
            sp.Engine(backend="dask", address=cluster)
    finally:
        _stop([other])


def test_an_engine_on_a_client_leaves_the_client_open_and_the_workers_clean(client: Any) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    with sp.Engine(backend=client) as eng:
        assert eng.map(_tasks.double, range(10)).values == [2 * i for i in range(10)]
        lanes = eng.worker_pids()
        assert len(lanes) == 2
    assert client.submit(_tasks.double, 4, pure=False).result(timeout=WAIT) == 8
    assert _our_plugins(client) == []  # our plugin is gone from every worker
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in lanes), timeout=10)


def test_a_worker_that_joins_gets_chunks_and_one_that_leaves_is_no_loss(
        cluster: str, client: Any, tmp_path: Path) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    with sp.Engine(backend="dask", address=cluster) as eng:
        third = _start_worker(cluster, "--nthreads", "1")
        try:
            client.wait_for_workers(3, timeout=WAIT)
            work = [(i, 0.3, str(tmp_path)) for i in range(9)]
            assert eng.map(_tasks.note_then_sleep, work, chunk_size=1).values == list(range(9))
            ran_on = {int((tmp_path / str(i)).read_text()) for i in range(9)}
            assert len(ran_on) == 3  # every dask worker ran some, the new one included
        finally:
            _stop([third])
        # Once the scheduler knows it left, nothing is sent to it.
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, WAIT)
        last = eng.map(_tasks.double, range(8), chunk_size=1)
        assert last.values == [2 * i for i in range(8)], last.summary()


@pytest.mark.parametrize("rerun_innocent", [True, False])
def test_a_worker_retired_mid_batch_blames_nothing_and_counts_every_run(
        cluster: str, client: Any, tmp_path: Path, rerun_innocent: bool) -> None:
    """A graceful leave (retire_workers, a scale-down) is nobody's crash. Dask does not wait for
    the running chunk: the worker closes at once and its lanes are killed mid-chunk. The worker
    records how many items of it had started; those count that run (re-run: ``attempts`` 2;
    with rerun_innocent=False not run again, their results reported lost with the retired
    worker); the rest of the chunk and everything queued run elsewhere, charged nothing."""
    client.wait_for_workers(2, timeout=WAIT)
    before = set(client.scheduler_info()["workers"])
    third = _start_worker(cluster, "--nthreads", "1")
    try:
        client.wait_for_workers(3, timeout=WAIT)
        (leaving,) = set(client.scheduler_info()["workers"]) - before
        leaving_pid = str(client.run(os.getpid, workers=[leaving])[leaving])
        with sp.Engine(backend="dask", address=cluster, chunk_size=3,
                       rerun_innocent=rerun_innocent) as eng, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            work = [(i, 0.4, str(tmp_path)) for i in range(12)]
            running = pool.submit(eng.map, _tasks.note_runs_then_sleep, work)
            # the second item of its chunk runs: one has run, one runs, one waits
            assert wait_until(lambda: sum(pids.count(leaving_pid) for pids in
                                          _ran_on(tmp_path, 12).values()) == 2, timeout=WAIT)
            client.retire_workers([leaving], close_workers=True)
            report = running.result(timeout=WAIT)
        runs = [len(pids) for pids in _ran_on(tmp_path, 12).values()]
        interrupted = [i for i, pids in _ran_on(tmp_path, 12).items() if pids[0] == leaving_pid]
        assert interrupted and [o.attempts for o in report] == runs, report.summary()
        if rerun_innocent:
            assert report.values == list(range(12)), report.summary()
            assert [i for i, n in enumerate(runs) if n == 2] == interrupted
        else:
            assert runs == [1] * 12 and [o.index for o in report.failed] == interrupted
            assert all(o.kind == "crash" and "was retired while running its chunk" in str(o.error)
                       and leaving in str(o.error) for o in report.failed)
    finally:
        _stop([third])


def _ran_on(folder: Path, n: int) -> dict[int, list[str]]:
    """Per item of ``_tasks.note_runs_then_sleep``: the pid of the dask worker of each run."""
    return {i: (folder / str(i)).read_text().split() if (folder / str(i)).exists() else []
            for i in range(n)}


def test_an_asynchronous_client_is_refused_at_once(cluster: str) -> None:
    async def refused() -> None:
        async with distributed.Client(cluster, asynchronous=True, timeout=WAIT,
                                      set_as_default=False) as client:
            with pytest.raises(TypeError, match=r"asynchronous distributed.Client .* needs a "
                                                r"synchronous Client.* address="):
                sp.Engine(backend=client)

    asyncio.run(asyncio.wait_for(refused(), WAIT))


# ---- mem_per_task and the workers' memory --------------------------------------------------------

@pytest.fixture(scope="module")
def memory_cluster() -> Iterator[str]:
    """Two workers that declare the MEMORY resource: 2 threads with 1 GB, 1 thread with 100 MB."""
    with _real_cluster(("--nthreads", "2", "--resources", "MEMORY=1e9"),
                       ("--nthreads", "1", "--resources", "MEMORY=1e8")) as address:
        yield address


def test_mem_per_task_asks_for_the_memory_resource_the_workers_declare(
        memory_cluster: str, tmp_path: Path) -> None:
    with sp.Engine(backend="dask", address=memory_cluster, mem_per_task="400MB") as eng:
        assert eng.workers == 2  # 1 GB holds two chunks of 400 MB, 100 MB none
        assert "limited by memory" in eng.plan.reason and "MEMORY resource" in eng.plan.reason
        work = [(i, 0.2, str(tmp_path)) for i in range(8)]
        assert eng.map(_tasks.note_then_sleep, work, chunk_size=1).values == list(range(8))
        ran_on = {(tmp_path / str(i)).read_text() for i in range(8)}
        assert len(ran_on) == 1  # the small worker got no task
        assert len(eng.worker_pids()) == 2  # and runs no lane: two on the big one
    with pytest.raises(ValueError, match=r"mem_per_task=1.9 GiB fits no worker .* 953.7 MiB"):
        sp.Engine(backend="dask", address=memory_cluster, mem_per_task="2GB")


def test_without_a_memory_resource_mem_per_task_sizes_by_memory_limit(
        cluster: str, client: Any) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    with sp.Engine(backend="dask", address=cluster, mem_per_task=min(limits) // 2) as eng:
        assert eng.workers == 2
        assert "sized by memory_limit" in eng.plan.reason
        assert eng.map(_tasks.double, range(4)).values == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="fits no worker of the dask cluster"):
        sp.Engine(backend="dask", address=cluster, mem_per_task=2 * max(limits))


def test_an_in_process_cluster_the_user_overcommits_warns_and_runs() -> None:
    """As locally: an explicit worker count beyond memory / mem_per_task is warned about, then
    honoured (each in-process worker then declares mem_per_task of MEMORY, not its share)."""
    per_task = distributed.system.MEMORY_LIMIT * 3 // 4
    with pytest.warns(sp.OvercommitWarning), \
            sp.Engine(backend="dask", workers=2, mem_per_task=per_task) as eng:
        assert eng.workers == 2
        assert eng.map(_tasks.double, [1, 2, 3]).values == [2, 4, 6]


def _our_plugins(client: Any) -> list[str]:
    names = client.run(lambda dask_worker: [n for n in dask_worker.plugins if "stagepool" in n])
    return [name for per_worker in names.values() for name in per_worker]


def test_closing_the_client_under_an_engine_cancels_instead_of_hanging(
        cluster: str, client: Any) -> None:
    with distributed.Client(cluster, timeout=WAIT, set_as_default=False) as own:
        eng = sp.Engine(backend=own)
        assert eng.map(_tasks.double, [1]).values == [2]
    # Never a hang: refused at the door naming why (Backend.check_open) once the backend has
    # seen the client go, or every item cancelled if the call came first.
    try:
        report = eng.map(_tasks.double, range(4))
    except sp.EngineClosed as error:
        assert "dask client of this engine was closed" in str(error)
    else:
        assert [o.kind for o in report] == ["cancelled"] * 4
    with pytest.raises(sp.EngineClosed, match="dask client of this engine was closed"):
        eng.submit(_tasks.double, 1)
    eng.shutdown()
    assert _our_plugins(client) == []  # removed all the same: no lanes idle on the workers


# The engine's own cluster shut down in a process of its own: its stderr is all dask printed, and
# what it started (nannies, workers, their lanes) is listed before the shutdown. Its own
# multiprocessing resource tracker is the interpreter's, which lives as long as it does.
_OWN_CLUSTER_SHUTDOWN = """
import os, time, psutil, stagepool as sp

def alive(procs):
    pids = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids

def started_by_the_engine(p):
    try:
        return not (p.ppid() == os.getpid() and "resource_tracker" in " ".join(p.cmdline()))
    except psutil.NoSuchProcess:  # gone already
        return False

with sp.Engine(backend="dask", workers=2) as eng:
    assert eng.map(abs, [-1, -2, -3]).values == [1, 2, 3]
    ours = [p for p in psutil.Process().children(recursive=True) if started_by_the_engine(p)]
    started = time.monotonic()
print(f"shutdown took {time.monotonic() - started:.2f} s", flush=True)
deadline = time.monotonic() + 10
while alive(ours) and time.monotonic() < deadline:
    time.sleep(0.05)
print("left running:", alive(ours))
"""


def test_the_engines_own_cluster_shuts_down_in_order_printing_nothing() -> None:
    """Its workers get time to exit before their nannies would kill them: here each worker's
    closing takes 5 s (a preload; a loaded machine's took over 4 s), beyond the 4 s a nanny
    waits by default before it prints "Worker process still alive after 4.0 seconds, killing"
    and SIGKILLs the worker. Nothing it started is left running."""
    env = {**os.environ, "STAGEPOOL_TEST_SLOW_EXIT": "5",
           "DASK_DISTRIBUTED__WORKER__PRELOAD": '["_dask_hooks"]',
           "PYTHONPATH": os.pathsep.join([TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", _OWN_CLUSTER_SHUTDOWN], env=env,
                          capture_output=True, text=True, timeout=4 * WAIT)
    assert done.returncode == 0, done.stderr
    assert "still alive" not in done.stderr, done.stderr
    assert "left running: []" in done.stdout, done.stdout + done.stderr


_KILLED_CALLER = """
import sys, time, distributed, stagepool as sp, _tasks
client = distributed.Client(sys.argv[1], timeout=2, set_as_default=False)  # reconnects within 2 s
eng = sp.Engine(backend=client)
assert eng.map(_tasks.double, range(4)).values == [0, 2, 4, 6]
print(*eng.worker_pids(), flush=True)
time.sleep(600)
"""


def _scheduler_plugins(client: Any) -> list[str]:
    return [name for name in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.worker_plugins)) if "stagepool" in name]


def test_a_sigkilled_caller_leaves_no_lanes_on_the_cluster(cluster: str, client: Any) -> None:
    """The caller's process is SIGKILLed: nobody removes its plugin, so the workers do once its
    client has been gone past its reconnect window. Before, its lanes idled on every worker for
    the cluster's lifetime and came back with each worker that joined or restarted."""
    client.wait_for_workers(2, timeout=WAIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])}
    caller = subprocess.Popen([sys.executable, "-c", _KILLED_CALLER, cluster], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        lanes = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(lanes) == 2 and _scheduler_plugins(client)
    finally:
        caller.kill()
        caller.wait(timeout=WAIT)
        if caller.stdout is not None:
            caller.stdout.close()
    # gone within its 2 s reconnect window + the 10 s margin + a 5 s poll, with room for load
    assert wait_until(lambda: not _scheduler_plugins(client), timeout=2 * WAIT)
    assert wait_until(lambda: not _our_plugins(client), timeout=WAIT)
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in lanes), timeout=WAIT)


def test_a_scheduler_killed_mid_batch_blames_no_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler dies mid-batch: the batch ends (once the client gives up reconnecting)
    with every item ok or cancelled. The chunks running then were answered "crash: the worker
    died while running item k", though no worker died and no item did anything wrong."""
    from stagepool._backends._dask import _cluster

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    workers = [_start_worker(address, "--nthreads", "1") for _ in range(2)]
    try:
        # Up first: the shortened window bounds connecting too, and on a busy machine the
        # scheduler took longer than 3 s to listen (ConnectionRefused, a flake of this test).
        with distributed.Client(address, timeout=WAIT, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=WAIT)
        monkeypatch.setattr(_cluster, "RPC_TIMEOUT", 3.0)  # the client's reconnect window, shortened
        with sp.Engine(backend="dask", address=address, chunk_size=1) as eng:
            eng.map(_tasks.sleep_for, [0.0, 0.0])  # both workers serve
            stream = eng.imap(_tasks.sleep_for, [0.5] * 40)
            assert next(stream).ok  # under way
            os.kill(scheduler.pid, signal.SIGKILL)
            kinds = {outcome.kind for outcome in stream}
        assert kinds <= {"ok", "cancelled"}, kinds
    finally:
        _stop([scheduler, *workers])


@pytest.mark.parametrize(("actions", "left"), [
    (["add-client"], False),
    (["add-client", "scatter", "remove-client"], True),
    (["add-client", "remove-client", "add-client"], False),  # reconnected
    (["scatter"] * 3, False),  # its arrival pushed out of the log: present, as far as we know
    ([], True),  # the topic dropped an hour after it left, or a restarted scheduler
])
def test_a_client_counts_as_gone_by_its_last_arrival_or_departure(
        actions: list[str], left: bool) -> None:
    from stagepool._backends._dask._owner import owner_left

    assert owner_left([(float(i), {"action": a}) for i, a in enumerate(actions)]) is left


def test_a_cluster_that_cannot_be_reached_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from stagepool._backends._dask import _cluster

    monkeypatch.setattr(_cluster, "RPC_TIMEOUT", 1.0)  # the bound on connecting, shortened
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(OSError, match=f"cannot reach the dask scheduler at {address}"):
        sp.Engine(backend="dask", address=address)
    with warnings.catch_warnings():  # tornado's refused connection leaves its socket to the GC
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.parametrize("address", ["htp://127.0.0.1:8786", "127.0.0.1 8786", "tcp://host:port"])
def test_a_malformed_address_is_named_and_leaves_no_client_behind(address: str) -> None:
    """A typo in the address is a ValueError naming it, and the script still exits at once:
    a Client built on it lingered half-made and held the interpreter's exit for 60 s
    ("Exception ignored in Client.__del__ ... timed out after 60 s")."""
    code = ("import sys, stagepool as sp\n"
            "try:\n    sp.Engine(backend='dask', address=sys.argv[1])\n"
            "except ValueError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                          timeout=WAIT, check=True)
    assert f"address={address!r}" in done.stdout
    assert "Exception ignored" not in done.stderr, done.stderr


def test_a_cluster_without_workers_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from stagepool._backends._dask import _cluster

    monkeypatch.setattr(_cluster, "FIRST_WORKER_TIMEOUT", 1.0)  # the wait for a worker, shortened
    port = _free_port()
    scheduler = _start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    try:
        with pytest.raises(RuntimeError, match=f"has no worker .* dask worker tcp://127.0.0.1:{port}"):
            sp.Engine(backend="dask", address=f"tcp://127.0.0.1:{port}")
    finally:
        _stop([scheduler])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"backend": "local", "address": "tcp://127.0.0.1:8786"}, ValueError, "needs backend='dask'"),
    ({"backend": "dask", "address": "tcp://127.0.0.1:8786", "workers": 2}, ValueError,
     "brings its own workers"),
    ({"backend": "dask", "address": 8786}, TypeError, "address must be a scheduler address"),
    ({"backend": object()}, TypeError, "or a distributed.Client, not object"),
])
def test_bad_cluster_arguments_are_named_before_anything_starts(
        kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(**kwargs)


def test_without_dask_the_error_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['distributed'] = sys.modules['dask'] = None\n"
            "import stagepool as sp\n"
            "try:\n    sp.Engine(backend='dask')\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=WAIT, check=True).stdout
    assert 'pip install "stagepool[dask]"' in out


def test_dask_chunks_carry_more_work_than_local_ones(dask_engine: sp.Engine,
                                                   local_engine: sp.Engine) -> None:
    """A dask chunk costs a scheduler round trip: it is sized for 0.5 s of work, not 20 ms."""
    items = [0.01] * 200
    local, dask = (eng.map(_tasks.sleep_for, items) for eng in (local_engine, dask_engine))
    assert local.values == dask.values == items
    assert dask.stats.chunks < local.stats.chunks / 2


def test_lanes_follow_their_dask_workers_native_thread_budget(dask_engine: sp.Engine) -> None:
    """dask's nanny caps each worker at OMP_NUM_THREADS=1 (two of them share this host); the
    lanes get that budget for every BLAS/OpenMP variable, not the host's CPUs for the ones the
    nanny leaves unset (which oversubscribed the cores: 2 BLIS threads per lane on 2 CPUs)."""
    from stagepool._resources import THREAD_ENV_VARS

    names = [*THREAD_ENV_VARS, "STAGEPOOL_WORKER_THREADS"]
    report = dask_engine.map(_tasks.env_of, names, chunk_size=1)
    assert report.values == ["1"] * len(names), dict(zip(names, report.values, strict=True))


def test_a_local_engine_never_imports_distributed() -> None:
    code = ("import sys, stagepool as sp\n"
            "with sp.Engine(workers=1) as eng:\n    eng.map(abs, [-1])\n"
            "print(sorted({'dask', 'distributed'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=WAIT, check=True).stdout
    assert out.strip() == "[]"


# ---- data: dask's transport, never shared memory ------------------------------------------------

def test_big_arrays_travel_through_dask_not_shared_memory(dask_engine: sp.Engine) -> None:
    import numpy as np

    before = shm_entries()
    arrays = [np.full(1 << 20, i, dtype=np.float64) for i in range(4)]  # 8 MiB each: scattered
    report = dask_engine.map(_tasks.identity, arrays)
    assert [float(a[0]) for a in report.values] == [0.0, 1.0, 2.0, 3.0]
    assert all(a.flags.writeable and a.nbytes == 8 << 20 for a in report.values)
    assert shm_entries() == before
    assert not dask_engine.capabilities.shared_memory


# ---- the profiler on a cluster ------------------------------------------------------------------

def test_profile_runs_its_sweep_on_the_cluster(cluster: str, client: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``stagepool profile --backend dask --address``: the cluster's size is the one worker count;
    the chunk sizes are swept on it. Its text names the cluster's workers and threads: it said
    this machine's "limited by cpu: 2 usable CPUs" and recommended a ``workers=`` that an engine
    on a cluster refuses."""
    from stagepool.cli import main

    client.wait_for_workers(2, timeout=WAIT)
    code = main(["profile", "_profile_tasks:nap", "--items", "_profile_tasks:nap_items",
                 "--sample", "4", "--chunk-sizes", "1,2", "--run-seconds", "0.3", "--repeat", "1",
                 "--backend", "dask", "--address", cluster, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    (line,) = [line for line in out.splitlines() if line.startswith("recommended:")]
    assert "workers=" not in line and "[limited by cluster;" in line, out
    assert ("  workers: 2: " in out and f"limited by cluster: dask cluster at {cluster}, "
            "2 workers x 1 thread (its threads are the workers)" in out), out
    assert "limited by cpu" not in out, out
    profile = sp.profile_stage(_profile_tasks.nap, _profile_tasks.nap_items(), chunk_sizes=[2],
                               run_seconds=0.3, repeat=1, progress=False, backend="dask",
                               address=cluster)
    assert {run.workers for run in profile.runs} == {2}


@pytest.mark.parametrize("on", ["address", "client"])
def test_a_profile_made_on_a_cluster_starts_an_engine_on_it(
        cluster: str, client: Any, tmp_path: Path, on: str) -> None:
    """``stagepool profile --backend dask --address A --out DIR`` recommends the cluster's worker
    count; ``Engine.from_profile(DIR, backend="dask", address=A)`` raised "workers= sizes the
    in-process dask cluster only" on it: a cluster brings its own workers."""
    doc = {"format": "stagepool-profile/1", "recommended": {"workers": 2, "chunk_size": 2}}
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    target: dict[str, Any] = ({"backend": "dask", "address": cluster} if on == "address"
                              else {"backend": client})
    client.wait_for_workers(2, timeout=WAIT)
    with sp.Engine.from_profile(tmp_path, **target) as eng:
        assert eng.backend == "dask" and cluster in repr(eng)
        assert eng.map(_tasks.double, range(4)).values == [0, 2, 4, 6]


def test_profile_refuses_an_address_without_the_dask_backend() -> None:
    from stagepool.cli import main

    with pytest.raises(SystemExit, match="add --backend dask"):
        main(["profile", "--demo", "--address", "tcp://127.0.0.1:8786"])
    with pytest.raises(ValueError, match="brings its own workers"):
        sp.profile_stage(abs, [1], workers=2, backend="dask", address="tcp://127.0.0.1:8786")


def test_a_closing_worker_counts_the_items_each_running_chunk_had_started() -> None:
    """What a retired worker records (pure): the running item's offset + 1; 0 for a chunk no
    lane had taken; None (all, for the engine) when a lane was decoding or encoding it."""
    from stagepool._backends import Group, LaneState, Task
    from stagepool._backends._dask._plugin import started

    def task() -> Task:
        return Task(Group(), 0, b"", b"", 5, lambda _task, _answer: None)

    running, queued, encoding = task(), task(), task()
    states = [LaneState("11", running.id, 2, 0.0), LaneState("12", encoding.id, -1, None),
              LaneState("13", 0, -1, None)]
    chunks = {"a": running, "b": queued, "c": encoding}
    assert started(chunks, states) == {"a": 3, "b": 0, "c": None}
