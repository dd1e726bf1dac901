"""Task functions on big arrays for the dask transport tests: module-level so that workers
import them by reference."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def plus_one(a: Any) -> Any:
    return a + 1


def write_first(a: Any) -> float:
    """Writes into its input: fails on a read-only one."""
    a[0] = -1.0
    return float(a[0])


def exit_on_negative(a: Any) -> float:
    """Kills its lane (as a crash would) when the array starts with a negative number."""
    if a[0] < 0:
        os._exit(3)
    return float(a.sum())


def layouts(seed: int) -> dict[str, Any]:
    """Big results of every layout the transport must keep: Fortran order, a strided view made
    contiguous, a structured dtype, the same array twice, and a small one in the pickle."""
    rng = np.random.default_rng(seed)
    shared = rng.random(300_000)
    structured = np.zeros(200_000, dtype=[("a", "i4"), ("b", "f8")])
    structured["a"] = np.arange(200_000)
    return {"fortran": np.asfortranarray(rng.random((700, 300))),
            "strided": rng.random((1000, 400))[::2, ::3], "structured": structured,
            "twice": (shared, shared), "small": np.arange(10)}


def limit_file_size(limit: int) -> None:
    """Run in a dask worker (``client.run``): files it and its future lanes write stop at
    ``limit`` bytes, so a bigger /dev/shm segment fails with EFBIG as a full /dev/shm fails
    with ENOSPC (Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def segment_of(nbytes: int) -> tuple[str | None, list[str]]:
    """Run in a dask worker: ``_shm.create_segment`` of an ``nbytes`` array, and what it left."""
    from stagepool import _shm

    names: list[str] = []
    name = _shm.create_segment(np.ones(nbytes // 8), np, owner=os.getpid(), creator="p",
                               arena=None, segments=names)
    _shm.unlink_names(names)
    return name, names


def note_then_sleep_with_array(item: tuple[int, float, str, Any]) -> int:
    """``_tasks.note_then_sleep`` on an item that also carries a big array (which travels as a
    dask frame, scattered to the chunk's worker)."""
    import _tasks

    index, seconds, folder, _array = item
    return _tasks.note_then_sleep((index, seconds, folder))
