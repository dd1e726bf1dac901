"""Engine.status() (issue 14): per worker, idle or busy on which item of which batch, for how
long; on every backend, and from a progress callback."""

from __future__ import annotations

import threading

import pytest

import stagepool as sp
from _cost_tasks import Segment, stamp
from conftest import WAIT, wait_until


def seconds(seg: Segment) -> float:
    return seg.seconds


def test_status_names_the_running_item_and_its_batch(engine: sp.Engine) -> None:
    """A long segment (1.5 s) among short ones, sent first by its cost: while it runs, status
    shows a worker busy on its input index (6), for a growing number of seconds."""
    segs = [Segment(n, 1.0) for n in range(6)] + [Segment(6, 1500.0)] + \
        [Segment(n, 1.0) for n in range(7, 12)]
    done = threading.Event()
    box: list[sp.BatchReport[object]] = []

    def run() -> None:
        box.append(engine.map(stamp, segs, cost=seconds, desc="segments"))
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        exact = engine.backend != "dask"  # a cluster's lanes are on its hosts: chunk only

        def on_long() -> bool:
            return any(s.busy and (s.item == 6 or not exact) and (s.seconds or 0) > 0.2
                       for s in engine.status())

        assert wait_until(on_long, timeout=WAIT, interval=0.02)
        (busy,) = [s for s in engine.status() if s.busy and (s.item == 6 or not exact)][:1]
        assert busy.batch is not None and busy.desc == "segments"
        assert "busy on" in str(busy) and "of batch" in str(busy)
    finally:
        assert done.wait(WAIT)
        thread.join(WAIT)
    assert box[0].success_rate == 1.0
    assert wait_until(lambda: not any(s.busy for s in engine.status()), timeout=WAIT)
    assert all(str(s).endswith("idle") for s in engine.status())


def test_status_from_a_progress_callback(engine: sp.Engine) -> None:
    seen: list[list[sp.WorkerStatus]] = []
    engine.map(stamp, [Segment(n, 2.0) for n in range(20)],
               on_progress=lambda _p: seen.append(engine.status()))
    assert seen and all(isinstance(s, sp.WorkerStatus) for states in seen for s in states)
    assert all(len(states) >= 1 for states in seen)


def test_status_after_shutdown_says_closed() -> None:
    engine = sp.Engine(backend="serial")
    assert [s.busy for s in engine.status()] == [False]
    engine.shutdown()
    with pytest.raises(sp.EngineClosed):
        engine.status()
