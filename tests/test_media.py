"""What a media team ran into (issue 18): retries, read-only inputs, shared data, sizes, options.

Real worker processes throughout; each test failed before the change it covers.
"""

from __future__ import annotations

from pathlib import Path

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
