"""An Engine dropped without shutdown() releases its workers, threads and shared memory when it
is garbage-collected, with a ResourceWarning (a breaker's finding: they leaked until exit)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import psutil
import pytest

import stagepool as sp
from conftest import WAIT, shm_entries, wait_until


def _total(array: np.ndarray) -> float:
    return float(array.sum()) + float(sp.shared("table")[0])


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if _alive(p)}


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # it exited between the listing and this look
        return False


def _use_and_drop(backend: str) -> weakref.ref[sp.Engine]:
    """An engine made in a function that returns without closing it (a forgetful handler)."""
    options = {} if backend == "serial" else {"workers": 2}
    eng = sp.Engine(backend=backend, shared={"table": np.ones(512 * 1024)},  # in /dev/shm
                    shm_threshold="64KiB", **options)
    report = eng.map(_total, [np.ones(64 * 1024)] * 4)  # inputs through /dev/shm too
    assert report.values == [64 * 1024 + 1.0] * 4, report.failed
    return weakref.ref(eng)


def test_a_dropped_engine_releases_everything(engine: sp.Engine) -> None:
    engine.worker_pids()  # the session engine's workers are started (lazily) before we look
    processes, threads, segments = _descendants(), set(threading.enumerate()), shm_entries()
    with pytest.warns(ResourceWarning, match="garbage-collected without shutdown"):
        dropped = _use_and_drop(engine.backend)
        gc.collect()
    assert dropped() is None, gc.get_referrers(dropped())

    def left() -> tuple[set[int], set[str], set[str]]:
        return (_descendants() - processes - set(engine.worker_pids()),
                {t.name for t in set(threading.enumerate()) - threads if _ours(t)},
                shm_entries() - segments)

    assert wait_until(lambda: not any(left()), timeout=WAIT), left()


def _ours(thread: threading.Thread) -> bool:
    # The reaper serves every engine; distributed's offload and callback pools serve every client
    # of the process (started by the first one, on first use).
    return thread.name != "stagepool-reaper" and not thread.name.startswith("Dask-")


def _square(x: int) -> int:
    return x * x


N = 40
PIPELINE = sp.Pipeline().stage("square", _square)


def _open(kind: str) -> Any:
    """A stream of an engine nobody else references once this returns (a forgetful caller's
    ``for o in sp.Engine().imap(...)``)."""
    eng = sp.Engine(workers=1, chunk_size=1)
    if kind.startswith("imap"):
        return getattr(eng, kind)(_square, range(N))
    return getattr(eng, kind)(PIPELINE, range(N))


def _count(stream: Iterator[Any]) -> int:
    n = 0
    for _ in stream:
        gc.collect()  # the engine is referenced by nothing but the stream now
        n += 1
    return n


async def _count_async(stream: AsyncIterator[Any]) -> int:
    n = 0
    async for _ in stream:
        gc.collect()
        n += 1
    return n


@pytest.mark.parametrize("kind", ["imap", "imap_async", "run_iter", "run_iter_async"])
def test_a_stream_keeps_its_otherwise_dropped_engine(kind: str) -> None:
    # The engine must serve its stream to the end (the stream stopped after 3 of 40 items once
    # the engine was collected under it), then go when the stream does.
    with pytest.warns(ResourceWarning, match="garbage-collected without shutdown"):
        if kind.endswith("async"):
            assert asyncio.run(_count_async(_open(kind))) == N
        else:
            assert _count(_open(kind)) == N
        gc.collect()
