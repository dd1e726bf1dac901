"""A dask worker whose host has no room in /dev/shm for a chunk's big arrays (Docker's default
/dev/shm is 64 MiB) still runs the chunk, through its lanes' pipe: slower, never wrong. Real, not
mocked: the worker process's RLIMIT_FSIZE is lowered, so writing a segment bigger than the limit
fails with EFBIG, as writing one into a full /dev/shm fails with ENOSPC; its lanes inherit the
limit, so their big results cannot go to /dev/shm either."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import _dask_array_tasks as _array_tasks
import stagepool as sp
from conftest import WAIT

distributed = pytest.importorskip("distributed")

from stagepool._backends._dask import _cluster  # noqa: E402  (after the skip: imports dask)

MIB = 1 << 20
LIMIT = 2 * MIB  # a segment bigger than this cannot be written on the worker's host


@pytest.fixture(scope="module")
def cramped() -> Iterator[Any]:
    """A client of a one-worker LocalCluster whose worker (and its lanes) cannot write a file
    over LIMIT."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        client.run(_array_tasks.limit_file_size, LIMIT)
        yield client


def _worker_segments(client: Any) -> list[str]:
    pids = set(client.run(os.getpid).values())
    return [name for name in os.listdir("/dev/shm")
            if any(name.startswith(f"stagepool-{pid}-") for pid in pids)]


def test_a_segment_over_the_file_size_limit_is_no_room(cramped: Any) -> None:
    """EFBIG is an OSError like ENOSPC: ``create_segment`` says "no room" and leaves nothing."""
    (small, left_small), = cramped.run(_array_tasks.segment_of, LIMIT // 2).values()
    (big, left_big), = cramped.run(_array_tasks.segment_of, 2 * LIMIT).values()
    assert small is not None and big is None and left_small == [small] and left_big == []
    assert not _worker_segments(cramped)


def test_a_chunk_without_room_in_dev_shm_runs_through_the_pipe(cramped: Any) -> None:
    """Each item runs once and comes back ok; its big result came back in-band too (the lanes
    cannot write it to /dev/shm either); nothing is left in /dev/shm."""
    arrays = [np.full(4 * MIB // 8, float(i)) for i in range(4)]
    with sp.Engine(backend=cramped, chunk_size=2) as engine:
        report = engine.map(_array_tasks.plus_one, arrays, timeout=WAIT)
        small = engine.map(_array_tasks.plus_one, [np.zeros(LIMIT // 2 // 8)] * 2, timeout=WAIT)
        in_lane = engine.map(_array_tasks.segment_of, [4 * MIB], timeout=WAIT).values[0]
    assert [o.kind for o in report] == ["ok"] * 4, report.summary()
    assert [o.attempts for o in report] == [1] * 4
    for given, got in zip(arrays, report.values, strict=True):
        assert np.array_equal(got, given + 1) and got.flags.writeable
    assert small.success_rate == 1.0
    assert tuple(in_lane) == (None, [])  # so the lanes' 4 MiB results came back in-band
    assert not _worker_segments(cramped)


def test_after_one_refusal_a_worker_gets_such_chunks_in_band(cramped: Any) -> None:
    """Each refusal costs a wasted transfer of the chunk: once a worker said "no room", chunks as
    big go to it in-band at once. One worker thread holds at most two chunks of ours (one
    running, one waiting), so at most two are refused of six."""
    arrays = [np.full(4 * MIB // 8, float(i)) for i in range(6)]
    with sp.Engine(backend=cramped, chunk_size=1) as engine:
        report = engine.map(_array_tasks.plus_one, arrays, timeout=WAIT)
        backend: Any = engine._backend
        ended = _cluster.chunks_ended(cramped, backend._name, next(iter(cramped.run(os.getpid))))
    assert [o.kind for o in report] == ["ok"] * 6 and [o.attempts for o in report] == [1] * 6
    refused = [key for key, note in ended.items() if "no room" in str(note.get("cancelled"))]
    assert 1 <= len(refused) <= 2, ended


def test_inputs_stay_read_only_through_the_pipe(cramped: Any) -> None:
    """The in-band resend keeps the engine's input contract: read-only unless writable_inputs."""
    arrays = [np.zeros(4 * MIB // 8) for _ in range(2)]
    with sp.Engine(backend=cramped) as engine:
        report = engine.map(_array_tasks.write_first, arrays, timeout=WAIT)
    with sp.Engine(backend=cramped, writable_inputs=True) as engine:
        writable = engine.map(_array_tasks.write_first, arrays, timeout=WAIT)
    assert [o.kind for o in report] == ["error"] * 2 and "read-only" in str(report[0].error)
    assert writable.values == [-1.0, -1.0] and all(a[0] == 0.0 for a in arrays)
    assert not _worker_segments(cramped)
