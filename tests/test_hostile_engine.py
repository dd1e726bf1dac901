"""Hostile use, the engine side (issue 17): callbacks that raise, month-long timeouts, a pool
thread that fails, an exception or Ctrl-C leaving ``with Engine()``, shutdown under awaiting
calls. Real worker processes; every wait bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT


@pytest.mark.asyncio
async def test_submit_async_cancelled_by_shutdown_raises_task_cancelled() -> None:
    eng = sp.Engine(workers=1)
    try:
        busy = eng.submit(_tasks.sleep_for, 0.5)
        queued = asyncio.create_task(eng.submit_async(_tasks.double, 1))
        await asyncio.sleep(0.2)  # handed to the engine, queued behind the busy worker
        eng.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(sp.TaskCancelled, match="engine was shut down"):
            await asyncio.wait_for(queued, WAIT)
        assert not queued.cancelled()  # the task itself was not cancelled: it failed
        assert busy.result(timeout=WAIT) == 0.5
    finally:
        await asyncio.to_thread(eng.shutdown)
