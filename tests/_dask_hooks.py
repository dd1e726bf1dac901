"""Test-only dask worker plugins, importable by the test cluster's workers (``PYTHONPATH`` holds
this folder): they widen a window that is milliseconds long in real life, so that a test can hit
it every time."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

# How long a held fetch waits for the test to kill its worker (a bound, never reached).
HOLD_SECONDS = 60.0


class HoldFirstResult(WorkerPlugin):
    """Holds the first fetch of an engine's chunk result (the ``get_data`` a gather sends to
    the worker that holds it) for as long as ``folder/armed`` exists to claim: it writes the
    worker's pid to ``folder/held``, then waits. By then the chunk has ended and its end is
    recorded with the scheduler; the test kills the worker before its result is fetched."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.original: Any = None

    def setup(self, worker: Any) -> None:
        self.original = worker.handlers["get_data"]
        worker.handlers["get_data"] = self.get_data

    def teardown(self, worker: Any) -> None:
        if self.original is not None:
            worker.handlers["get_data"] = self.original

    async def get_data(self, comm: Any, keys: Any, who: Any = None,
                       serializers: Any = None) -> Any:
        if any(str(key).startswith("stagepool-") for key in keys) and self._claim():
            held = os.path.join(self.folder, "held")
            with open(held + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(held + ".tmp", held)
            await asyncio.sleep(HOLD_SECONDS)
        return await self.original(comm, keys=keys, who=who, serializers=serializers)

    def _claim(self) -> bool:
        try:
            os.unlink(os.path.join(self.folder, "armed"))
        except FileNotFoundError:
            return False
        return True


def dask_teardown(worker: Any) -> Any:
    """As a worker preload (``distributed.worker.preload``): a worker whose closing takes
    ``STAGEPOOL_TEST_SLOW_EXIT`` seconds, as a loaded machine's did (over the 4 s a nanny waits
    by default)."""
    return asyncio.sleep(float(os.environ.get("STAGEPOOL_TEST_SLOW_EXIT", "0")))
