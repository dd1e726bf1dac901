"""What a media team ran into (issue 18): retries, read-only inputs, shared data, sizes, options.

Real worker processes throughout; each test failed before the change it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import _media_tasks as mt
import _tasks
import stagepool as sp
from conftest import WAIT

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
    assert report[0].kind == "error" and "writable_inputs=True" in str(
        getattr(report[0].error, "__notes__", ""))
