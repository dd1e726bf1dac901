"""A spare worker is forked ahead of need once kills are possible, so a killed worker's
replacement takes the next item at once (``_backends/_local/_spare.py``)."""

from __future__ import annotations

import time

import psutil
import pytest

import _bundle_tasks as bt
import stagepool as sp
from conftest import WAIT, stagepool_workers, wait_until


def spare_of(engine: sp.Engine) -> int | None:
    return engine._backend.spare_pid()  # type: ignore[union-attr]


def test_the_replacement_of_a_timed_out_worker_was_forked_before_the_kill() -> None:
    with sp.Engine(workers=1, timeout=1.0) as engine:
        assert engine.submit(bt.sleep_for, 0.0).result(timeout=WAIT) == 0.0  # a limit: spare wanted
        assert wait_until(lambda: spare_of(engine) is not None)
        spare = spare_of(engine)
        hung = engine.submit(bt.hang_on_bad, bt.BAD)
        with pytest.raises(sp.TaskTimeout):
            hung.result(timeout=WAIT)
        assert engine.worker_pids() == [spare]  # the spare took over
        assert engine.submit(bt.sleep_for, 0.0).result(timeout=WAIT) == 0.0
        assert wait_until(lambda: spare_of(engine) not in (None, spare))  # and a new one waits
        pids = {*engine.worker_pids(), spare_of(engine)}
    assert wait_until(lambda: not (pids & stagepool_workers()), timeout=10)  # none left behind


def test_no_spare_without_limits_or_deaths() -> None:
    with sp.Engine(workers=1) as engine:
        assert engine.submit(bt.sleep_for, 0.0).result(timeout=WAIT) == 0.0
        time.sleep(0.2)
        assert spare_of(engine) is None


def test_a_spare_that_dies_is_reaped_and_not_replaced() -> None:
    with sp.Engine(workers=1, timeout=5.0) as engine:
        engine.submit(bt.sleep_for, 0.0).result(timeout=WAIT)
        assert wait_until(lambda: spare_of(engine) is not None)
        spare = spare_of(engine)
        assert spare is not None
        psutil.Process(spare).kill()
        assert wait_until(lambda: spare_of(engine) is None)
        assert engine.submit(bt.sleep_for, 0.0).result(timeout=WAIT) == 0.0
        assert spare_of(engine) is None
