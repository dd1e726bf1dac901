"""What a media team ran into (issue 18): retries, read-only inputs, shared data, sizes, options.

Real worker processes throughout; each test failed before the change it covers.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import _media_tasks as mt
import _tasks
import stagepool as sp
from conftest import WAIT, wait_until

# ---- 18.3: retry defaults -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "serial"])
def test_an_error_is_not_retried_by_default(backend: str) -> None:
    # A corrupt file is a deterministic error: decoding it again only doubles the noise.
    with sp.Engine(backend=backend, workers=1, retries=2) as eng:
        report = eng.map(_tasks.fail_on, [(1, True), (2, False)])
        future = eng.submit(_tasks.fail_on, (3, True))
        with pytest.raises(ValueError):
            future.result(timeout=WAIT)
    assert report[0].kind == "error" and report[0].attempts == 1
    assert report[1].ok and report.stats.retries == 0


def test_a_crash_is_retried_by_default(tmp_path: Path) -> None:
    with sp.Engine(workers=1, retries=1) as eng:
        report = eng.map(mt.crash_once, [str(tmp_path / "marker")])
    assert report[0].ok and report[0].attempts == 2


def test_errors_stay_retryable_on_request() -> None:
    with sp.Engine(workers=1, retries=1, retry_on=("error", "crash", "timeout")) as eng:
        report = eng.map(_tasks.fail_on, [(1, True)])
    assert report[0].attempts == 2


# ---- 18.2: inputs read-only at every size ----------------------------------------------------

RATE = 48_000


def _stereo(seconds: int) -> np.ndarray:
    return np.ones((seconds * RATE, 2), np.float32)  # 2 s: 768 KB, 3 s: 1.1 MiB


@pytest.mark.parametrize("seconds", [2, 3])
def test_an_in_place_change_fails_the_same_way_at_every_size(seconds: int) -> None:
    with sp.Engine(workers=1) as eng:
        report = eng.map(mt.gain_in_place, [_stereo(seconds)])
    error = report[0].error
    assert report[0].kind == "error" and isinstance(error, ValueError), report[0]
    assert "read-only" in str(error)
    assert any("writable_inputs=True" in note for note in getattr(error, "__notes__", []))


@pytest.mark.parametrize("seconds", [2, 3])
def test_writable_inputs_allow_an_in_place_change_at_every_size(seconds: int) -> None:
    segment = _stereo(seconds)
    with sp.Engine(workers=1, writable_inputs=True) as eng:
        report = eng.map(mt.gain_in_place, [segment])
        submitted = eng.submit(mt.gain_in_place, segment).result(timeout=WAIT)
    assert report.values == [seconds * RATE * 1.0] and submitted == seconds * RATE * 1.0
    assert float(segment[0, 0]) == 1.0  # the caller's array is never changed


def test_small_inputs_are_read_only_on_dask_too() -> None:
    pytest.importorskip("distributed")
    with sp.Engine(backend="dask", workers=1) as eng:
        report = eng.map(mt.gain_in_place, [_stereo(2)])
        assert "1 worker x 1 thread" in str(eng.plan)  # 18.8: not "1 workers x 1 thread"
    assert report[0].kind == "error" and "writable_inputs=True" in str(
        getattr(report[0].error, "__notes__", ""))


# ---- 18.1: shared read-only data, and initargs that never block ------------------------------

MiB = 2**20
BANK = np.arange(2 * MiB, dtype=np.float32)  # 8 MiB: one copy for the whole pool
BANK_SUM = float(BANK.sum())


def _ours() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"stagepool-{os.getpid()}-s")}


@pytest.mark.parametrize("backend", ["local", "serial", "dask"])
def test_shared_values_reach_every_task_read_only(backend: str) -> None:
    if backend == "dask":
        pytest.importorskip("distributed")
    shared = {"bank": BANK, "table": {"gain": 0.5}, "small": np.ones(4)}
    with sp.Engine(backend=backend, workers=2, shared=shared) as eng:
        report = eng.map(mt.shared_sum, ["bank"] * 6, chunk_size=1)
        assert report.values == [BANK_SUM] * 6
        assert eng.submit(mt.shared_value, "table").result(timeout=WAIT) == {"gain": 0.5}
        threaded = eng.map(mt.shared_sum_in_threads, ["bank"] * 2)  # from the task's threads
        assert threaded.values == [[BANK_SUM] * 2] * 2, threaded.failed
        for name in ("bank", "small"):  # read-only at every size
            [written] = eng.map(mt.write_shared, [name]).failed
            assert isinstance(written.error, ValueError) and "read-only" in str(written.error)
        [missing] = eng.map(mt.shared_value, ["nope"]).failed
        assert isinstance(missing.error, LookupError)
        assert "'bank'" in str(missing.error) and "'table'" in str(missing.error)
    assert float(BANK[0]) == 0.0  # the caller's array is never touched


def test_shared_arrays_are_one_mapping_for_every_worker_and_each_replacement() -> None:
    with sp.Engine(workers=2, shared={"bank": BANK}) as eng:
        infos = eng.map(mt.shared_info, ["bank"] * 8, chunk_size=1).values
        assert {(writeable, view) for _pid, writeable, view in infos} == {(False, True)}
        before = set(eng.worker_pids())
        [crash] = eng.map(mt.shared_then_exit, ["bank"]).failed
        assert crash.kind == "crash"
        report = eng.map(mt.pid_and_shared, ["bank"] * 8, chunk_size=1)
        assert report.ok and {s for _pid, s in report.values} == {BANK_SUM}
        assert set(eng.worker_pids()) - before  # a replacement served, with the same data
        assert _ours()  # while the engine lives, its shared segments stay for respawns
    assert not _ours()  # freed with the engine


def test_shared_data_is_refused_early_and_clearly() -> None:
    with pytest.raises(TypeError, match="shared must be a dict"):
        sp.Engine(workers=1, shared=[BANK])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty str"):
        sp.Engine(workers=1, shared={1: BANK})  # type: ignore[dict-item]
    for backend in ("local", "serial"):
        with pytest.raises(TypeError, match=r"shared\['lock'\] cannot be pickled"):
            sp.Engine(backend=backend, workers=1, shared={"bank": BANK, "lock": threading.Lock()})
    assert not _ours()
    with pytest.raises(LookupError, match="Engine created with shared="):
        sp.shared("bank")


def test_a_killed_caller_leaves_no_shared_segment(tmp_path: Path) -> None:
    src = str(Path(sp.__file__).resolve().parent.parent)
    script = textwrap.dedent(f"""
        import sys, os, numpy as np
        sys.path[:0] = [{src!r}]
        import stagepool as sp
        eng = sp.Engine(workers=2, shared={{"bank": np.ones(2**21, np.float32)}})
        eng.map(abs, [1, 2])
        print(os.getpid(), flush=True)
        import time; time.sleep(60)
    """)
    out = tmp_path / "out"
    with out.open("w") as file:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=file, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: out.read_text().strip() != "", timeout=WAIT)
        child = int(out.read_text().split()[0])
        mine = lambda: {n for n in os.listdir("/dev/shm") if n.startswith(f"stagepool-{child}-")}  # noqa: E731
        assert mine()
        proc.kill()
        proc.wait(WAIT)
        assert wait_until(lambda: not mine(), timeout=10), mine()  # the orphaned workers freed it
    finally:
        proc.kill()


def test_large_initargs_never_go_through_the_start_pipe() -> None:
    # A worker's start-up arguments are written into a pipe the child reads only once its
    # interpreter runs: past 64 KiB, Engine() (and each respawn) waited for that.
    blob = b"x" * (4 * MiB)
    with sp.Engine(workers=2, initializer=mt.init_keep, initargs=(blob,)) as eng:
        setup = eng._backend._crew._setup  # type: ignore[union-attr]
        assert len(pickle.dumps(setup)) < 4096
        assert eng.map(mt.kept_len, range(4)).values == [len(blob)] * 4
        eng.map(_tasks.hard_exit, [0])  # a respawned worker gets them too
        assert eng.map(mt.kept_len, range(4)).values == [len(blob)] * 4
    assert not _ours()


# ---- 18.9: per-call options, and a submit's timeout names the call ------------------------------


def test_with_options_gives_a_submit_its_own_timeout_on_the_same_workers() -> None:
    with sp.Engine(workers=1) as eng:
        quick = eng.with_options(timeout=0.5)
        with pytest.raises(sp.TaskTimeout) as caught:
            quick.submit(_tasks.hang_sleep, 0).result(timeout=WAIT)
        message = str(caught.value)
        assert "hang_sleep" in message and "item 0" not in message, message
        assert quick.submit(_tasks.pid_of, None).result(timeout=WAIT) in eng.worker_pids()
        assert quick.submit(_tasks.add, 1, 2, c=3).result(timeout=WAIT) == 6  # kwargs: fn's
        assert eng.config.timeout is None  # the engine keeps its own options
        assert eng.submit(_tasks.sleep_for, 0.7).result(timeout=WAIT) == 0.7


def test_with_options_retries_apply_to_its_calls_only() -> None:
    with sp.Engine(workers=1) as eng:
        stubborn = eng.with_options(retries=2, retry_on=("error",))
        assert [o.attempts for o in stubborn.map(_tasks.fail_on, [(1, True)])] == [3]
        assert [o.attempts for o in stubborn.imap(_tasks.fail_on, [(1, True)])] == [3]
        assert [o.attempts for o in eng.map(_tasks.fail_on, [(1, True)])] == [1]
        assert stubborn.with_options(retries=0).map(_tasks.fail_on, [(1, True)])[0].attempts == 1


@pytest.mark.asyncio
async def test_with_options_async_calls() -> None:
    async with sp.Engine(workers=1) as eng:
        quick = eng.with_options(timeout=0.5)
        with pytest.raises(sp.TaskTimeout, match="hang_sleep"):
            await asyncio.wait_for(quick.submit_async(_tasks.hang_sleep, 0), WAIT)
        report = await asyncio.wait_for(quick.map_async(_tasks.hang_sleep, [0, 1]), WAIT)
        assert [o.kind for o in report] == ["timeout", "ok"]


def test_with_options_is_validated_at_the_door() -> None:
    with sp.Engine(workers=1) as eng:
        with pytest.raises(ValueError, match="timeout"):
            eng.with_options(timeout=-1)
        with pytest.raises(TypeError, match="retries"):
            eng.with_options(retries="2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="retry_on"):
            eng.with_options(retry_on=("bogus",))
        with pytest.raises(TypeError):
            eng.with_options(chunksize=2)  # type: ignore[call-arg]
    with sp.Engine(backend="serial") as eng, pytest.raises(ValueError, match="timeout"):
        eng.with_options(timeout=1)


def test_a_crashed_submit_names_the_call() -> None:
    with sp.Engine(workers=1) as eng, pytest.raises(sp.WorkerCrashed) as caught:
        eng.submit(_tasks.hard_exit, 0).result(timeout=WAIT)
    assert "hard_exit" in str(caught.value) and "item 0" not in str(caught.value)


# ---- 18.8: sizes that mean what they say -----------------------------------------------------


def test_mem_per_task_caps_each_worker_by_default() -> None:
    # 16 MiB per task: a worker may hold 4 x 16 MiB + 512 MiB of private memory; an item
    # that allocates 1 GiB fails alone with MemoryError instead of reaching the OOM killer.
    with sp.Engine(workers=1, mem_per_task="16MiB") as eng:
        report = eng.map(mt.allocate_mib, [1024, 8])
        assert report[0].kind == "error" and isinstance(report[0].error, MemoryError)
        assert any("mem_per_task" in n for n in getattr(report[0].error, "__notes__", []))
        assert report[1].value == 8  # the engine keeps serving
    with sp.Engine(workers=1, mem_per_task="16MiB", max_rss_per_worker="1GiB") as eng:
        assert eng.map(mt.allocate_mib, [1024]).values == [1024]  # an explicit cap wins


def test_reserve_cores_leaves_cores_to_the_parent() -> None:
    usable = sp.plan_workers().cpus
    with sp.Engine(reserve_cores=1) as eng:
        assert eng.workers == max(1, usable - 1) and "reserve_cores=1" in repr(eng)
        threads = eng.submit(_tasks.env_of, "OMP_NUM_THREADS").result(timeout=WAIT)
    if "OMP_NUM_THREADS" not in os.environ:  # BLAS threads share what is left, too
        assert threads == str(max(1, (usable - 1) // max(1, usable - 1)))
    with pytest.raises(ValueError, match="reserve_cores"):
        sp.Engine(reserve_cores=-1)
    with pytest.raises(TypeError, match="reserve_cores"):
        sp.Engine(reserve_cores="1")  # type: ignore[arg-type]


def test_plan_texts_count_in_the_singular_and_plural() -> None:
    with sp.Engine(workers=1) as one, sp.Engine(workers=3) as three:
        assert "1 workers" not in repr(one) and "1 worker (" in repr(one)
        assert "3 workers (explicit; the machine plan allows" in repr(three)


def test_the_drop_in_executor_hands_out_writable_arguments_as_the_stdlib_does() -> None:
    with sp.ProcessPoolExecutor(max_workers=1) as ex:
        assert ex.submit(mt.gain_in_place, _stereo(2)).result(timeout=WAIT) == 2 * RATE * 1.0


def test_a_returned_input_arrives_as_an_ordinary_writable_array(engine: sp.Engine) -> None:
    # Inputs are read-only now at every size; returning one must not hand the caller a
    # read-only result (results are ordinary writable arrays, on every backend).
    values = engine.map(_tasks.identity, [np.ones(16), np.ones(MiB)]).values
    assert [v.flags.writeable for v in values] == [True, True]


def _slow_init(path: str, seconds: float, table: np.ndarray) -> None:
    _tasks.sleep_then_touch(path, seconds)


@pytest.mark.asyncio
async def test_engine_construction_does_not_wait_for_its_workers(tmp_path: Path) -> None:
    """18.10: ``async with sp.Engine(...)`` blocked the event loop until the workers had started
    (2.8 s with large initargs). The constructor now returns before any initializer has run: the
    initializer's marker cannot exist yet when ``Engine()`` returns, and the loop serves at once."""
    marker = tmp_path / "initialized"
    table = np.zeros(4 * 2**20 // 8)  # 4 MiB of initargs: more than a pipe holds
    async with sp.Engine(workers=1, initializer=_slow_init,
                         initargs=(str(marker), 2.0, table)) as engine:
        assert not marker.exists()  # the worker is still in its initializer, or not started
        await asyncio.sleep(0)  # the loop is free while the worker starts
        assert (await engine.map_async(_tasks.double, [1, 2])).values == [2, 4]
        assert marker.exists()  # the batch waited for the worker, not the constructor


def _sum_shared(i: int) -> float:
    return float(sp.shared("w")[::512].sum()) + i


def test_shared_data_does_not_count_against_max_rss_per_worker() -> None:
    """A breaker's finding: 200 MiB of the pool's shared data, read whole by every item, made
    each item a "crash" (its worker's RSS passed the cap) and replaced the worker every time.
    The cap is on what a worker holds on its own."""
    weights = np.ones(200 * 2**20 // 8)
    with sp.Engine(workers=1, shared={"w": weights}, max_rss_per_worker="100MiB") as engine:
        first = engine.worker_pids()
        report = engine.map(_sum_shared, range(3), chunk_size=1)
        assert [o.kind for o in report] == ["ok"] * 3, report.summary()
        assert engine.worker_pids() == first  # never recycled for memory it does not own
