"""Choosing a backend, what each refuses, and bugs of the seam's rework (each failed before)."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT
from stagepool import _bridge, _recycling


def test_an_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of 'local', 'serial', 'dask' or a "
                                         r"distributed\.Client, got 'cluster'"):
        sp.Engine(backend="cluster")


@pytest.mark.parametrize("option", [{"timeout": 1.0}, {"max_rss_per_worker": "1GiB"},
                                    {"max_tasks_per_worker": 3}])
def test_serial_refuses_what_it_cannot_do(option: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"{next(iter(option))}= needs a backend that runs items"):
        sp.Engine(backend="serial", **option)


def test_serial_refuses_before_running_the_initializer() -> None:
    """The initializer (a model load, say) ran in this process first, then the refusal came."""
    ran: list[int] = []
    with pytest.raises(ValueError, match="timeout= needs a backend"):
        sp.Engine(backend="serial", timeout=1.0, initializer=ran.append, initargs=(1,))
    assert ran == []


def test_serial_neither_warns_nor_refuses_for_processes_it_never_starts() -> None:
    """A local configuration switched to backend="serial" for debugging raised an
    OvercommitWarning ("Starting 64 anyway risks the OOM killer") and refused a worker count
    over ``ulimit -n``: the serial backend starts no process."""
    memory = sp.plan_workers().mem_available
    for options in ({"workers": 64, "mem_per_task": memory}, {"workers": 10**6}):
        with sp.Engine(backend="serial", **options) as eng:  # warnings are errors here
            assert eng.workers == 1 and eng.map(_tasks.double, [1]).values == [2]


def test_serial_refuses_a_per_call_timeout(serial_engine: sp.Engine) -> None:
    with pytest.raises(ValueError, match="timeout= needs a backend"):
        serial_engine.map(_tasks.double, [1], timeout=5)
    assert serial_engine.map(_tasks.double, [1]).values == [2]


def test_serial_runs_in_this_process_with_the_same_report(serial_engine: sp.Engine) -> None:
    import os

    report = serial_engine.map(_tasks.fail_on, [(i, i == 3) for i in range(6)], chunk_size=4)
    assert [o.kind for o in report] == ["ok"] * 3 + ["error"] + ["ok"] * 2
    assert {o.worker for o in report} == {os.getpid()} == set(serial_engine.worker_pids())
    assert serial_engine.capabilities.exact_blame and not serial_engine.capabilities.processes
    assert serial_engine.backend == "serial" and "serial" in repr(serial_engine)


def test_serial_lets_a_real_ctrl_c_through(serial_engine: sp.Engine) -> None:
    with pytest.raises(KeyboardInterrupt):
        serial_engine.map(_tasks.raise_systemexit, [0, 2])  # item 2 raises it
    assert serial_engine.map(_tasks.double, [4]).values == [8]  # and keeps serving


def test_serial_initializer_failure_fails_every_item() -> None:
    with sp.Engine(backend="serial", initializer=_tasks.init_fail) as eng:
        report = eng.map(_tasks.double, range(3))
    assert [o.kind for o in report] == ["error"] * 3
    assert all(isinstance(o.error, sp.InitializerError) for o in report)


def test_serial_initializer_calling_sys_exit_fails_every_item() -> None:
    """It escaped the constructor as SystemExit (ending a script), where a local worker's
    initializer exit fails each item with InitializerError."""
    import sys

    with sp.Engine(backend="serial", initializer=sys.exit, initargs=(4,)) as eng:
        report = eng.map(_tasks.double, range(2))
    assert all(isinstance(o.error, sp.InitializerError) for o in report), report
    assert "SystemExit: 4" in str(report[0].error)


@pytest.mark.needs("serializes")
def test_ctrl_c_while_pickling_a_chunk_stops_the_batch(engine: sp.Engine) -> None:
    """It was caught as an encoding failure: the batch went on, item by item."""
    with pytest.raises(KeyboardInterrupt):
        engine.map(_tasks.double, [1, 2, _tasks.InterruptsPickling(), 4], chunk_size=4)
    assert engine.map(_tasks.double, [5]).values == [10]


def test_an_imap_never_iterated_holds_nothing(engine: sp.Engine) -> None:
    """It opened a shared-memory arena (and a progress bar) at the call, freed never."""
    gc.collect()
    before = len(_recycling.open_arenas())
    stream = engine.imap(_tasks.double, range(10), progress=True)
    assert len(_recycling.open_arenas()) == before
    del stream
    gc.collect()
    assert len(_recycling.open_arenas()) == before


def test_concurrent_async_calls_share_a_bounded_set_of_threads(engine: sp.Engine) -> None:
    """Each map_async call started a thread of its own: 1,000 calls, 1,000 threads."""
    calls = 3 * _bridge.MAX_THREADS
    peak = 0

    async def main() -> list[sp.BatchReport[int]]:
        nonlocal peak
        tasks = [asyncio.create_task(engine.map_async(_tasks.sleep_for, [0.02])) for _ in
                 range(calls)]
        while not all(t.done() for t in tasks):
            peak = max(peak, sum(t.name == "stagepool-aio-batch" for t in threading.enumerate()))
            await asyncio.sleep(0.005)
        return [t.result() for t in tasks]

    reports = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert all(r.ok for r in reports) and len(reports) == calls
    assert 0 < peak <= _bridge.MAX_THREADS
