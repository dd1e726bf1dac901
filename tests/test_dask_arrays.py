"""Big numpy arrays on the dask backend: they travel as dask frames beside the chunk's pickle
(never copied into it), reach the lanes through shared memory on the worker's host, and come
back the same way; every guarantee of the pickled path holds (values and layouts exact,
read-only inputs unless ``writable_inputs``, writable results, a crash blamed on its item, nothing
left in ``/dev/shm`` on any host)."""

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

from stagepool._backends._dask import PickleCodec  # noqa: E402  (after the skip: imports dask)
from stagepool._backends._dask._frames import FRAME_BYTES, Frames  # noqa: E402

MIB = 1 << 20


def _worker_segments(client: Any) -> list[str]:
    """The stagepool segments in /dev/shm owned by the cluster's workers (their lanes' too)."""
    pids = set(client.run(os.getpid).values())
    return [name for name in os.listdir("/dev/shm")
            if any(name.startswith(f"stagepool-{pid}-") for pid in pids)]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A LocalCluster of one one-thread worker process, for engines with their own settings."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        yield c


# ---- the codec: big arrays as frames, small ones in the pickle ----------------------------------

def test_big_arrays_travel_beside_the_pickle_as_views_of_the_callers_arrays() -> None:
    """The 6 copies of each byte before (into the pickle, through the lane's pipe and out of the
    pickle, each way) were what made a 100 MiB array 2x slower than dask's own client.map."""
    big, fortran, small = np.ones(4 * MIB // 8), np.asfortranarray(np.ones((600, 400))), np.ones(8)
    encoded = PickleCodec().encode([(big, small), {"f": fortran}], None)
    payload = encoded.payload
    assert isinstance(payload, Frames)
    assert payload.pickle.nbytes < 4096 and len(payload.frames) == 2
    assert np.shares_memory(payload.frames[0], big) and np.shares_memory(payload.frames[1], fortran)
    assert encoded.nbytes == payload.nbytes >= big.nbytes + fortran.nbytes


def test_items_without_a_big_array_stay_one_pickle() -> None:
    encoded = PickleCodec().encode([np.ones(FRAME_BYTES // 8 - 1), "text"], None)
    assert isinstance(encoded.payload, np.ndarray) and encoded.payload.dtype == np.uint8


# ---- on a cluster -------------------------------------------------------------------------------

def test_layouts_and_values_survive_the_round_trip(dask_engine: sp.Engine) -> None:
    inputs = [np.random.default_rng(i).random(3 * MIB // 8) for i in range(3)]
    report = dask_engine.map(_array_tasks.plus_one, inputs, timeout=WAIT)
    assert report.success_rate == 1.0, report.summary()
    for given, got in zip(inputs, report.values, strict=True):
        assert np.array_equal(got, given + 1) and got.flags.writeable
    value = dask_engine.map(_array_tasks.layouts, [7], timeout=WAIT).values[0]
    expected = _array_tasks.layouts(7)
    assert value["fortran"].flags.f_contiguous
    for name in ("fortran", "strided", "structured", "small"):
        assert value[name].dtype == expected[name].dtype
        assert np.array_equal(value[name], expected[name]), name
        assert value[name].flags.writeable, name
    first, second = value["twice"]
    assert first is second and np.array_equal(first, expected["twice"][0])


def test_inputs_are_read_only_and_results_leave_no_segment(dask_engine: sp.Engine) -> None:
    arrays = [np.zeros(2 * MIB // 8) for _ in range(3)]
    report = dask_engine.map(_array_tasks.write_first, arrays, timeout=WAIT)
    assert [o.kind for o in report] == ["error"] * 3
    assert "read-only" in str(report[0].error)
    assert not _worker_segments(dask_engine._backend._client)  # type: ignore[attr-defined]


def test_writable_inputs_are_private_copies(client: Any) -> None:
    arrays = [np.zeros(2 * MIB // 8) for _ in range(2)]
    with sp.Engine(backend=client, writable_inputs=True) as engine:
        report = engine.map(_array_tasks.write_first, arrays, timeout=WAIT)
    assert report.values == [-1.0, -1.0]
    assert all(a[0] == 0.0 for a in arrays)  # the caller's arrays are untouched
    assert not _worker_segments(client)


def test_a_lane_killed_on_a_big_array_blames_its_item_and_leaves_no_segment(client: Any) -> None:
    arrays = [np.full(2 * MIB // 8, 1.0) for _ in range(6)]
    arrays[3] = np.full(2 * MIB // 8, -1.0)
    with sp.Engine(backend=client, chunk_size=3) as engine:
        report = engine.map(_array_tasks.exit_on_negative, arrays, timeout=WAIT)
        again = engine.map(_array_tasks.plus_one, arrays[:2], timeout=WAIT)
    assert [o.kind for o in report] == ["ok"] * 3 + ["crash"] + ["ok"] * 2
    assert all(o.attempts == 1 for i, o in enumerate(report) if i < 3)
    assert again.success_rate == 1.0
    assert not _worker_segments(client)


def test_a_client_that_must_not_reach_workers_directly_goes_through_the_scheduler(
        client: Any) -> None:
    with distributed.Client(client.scheduler.address, direct_to_workers=False,
                            set_as_default=False) as indirect, \
            sp.Engine(backend=indirect) as engine:
        report = engine.map(_array_tasks.plus_one, [np.zeros(2 * MIB // 8)] * 2, timeout=WAIT)
    assert [float(v[0]) for v in report.values] == [1.0, 1.0]
