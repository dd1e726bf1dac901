"""The working directory deleted while an engine lives: workers that die are replaced, in that
same (deleted) directory, and the engine keeps serving, whether the warm template forks them or
loky starts them (the template gone). Also loky's start path losing its resource tracker."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import _tasks
import stagepool as sp
from conftest import WAIT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a deleted cwd reached via /proc")


def _end_template(eng: sp.Engine) -> None:
    """Kill the workers' template: from now on workers start through loky (``_crew._fork``)."""
    template = eng._backend._crew._template  # type: ignore[attr-defined]
    assert template is not None
    os.kill(template.process.pid, signal.SIGKILL)
    template.process.wait(WAIT)


@pytest.mark.parametrize("start", ["template", "loky"])
def test_engine_keeps_serving_after_its_cwd_is_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str) -> None:
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    # A relative PYTHONPATH entry (``PYTHONPATH=src pytest``): a fresh interpreter in a deleted
    # directory could not make it absolute and died at start-up, every replacement alike.
    package_root = os.path.relpath(Path(sp.__file__).parents[1], here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    with sp.Engine(workers=1, chunk_size=1) as eng:
        assert eng.map(abs, [-1]).values == [1]
        os.rmdir(here)
        if start == "loky":
            _end_template(eng)
        crashed = eng.map(_tasks.hard_exit, [1, 0, 2], timeout=WAIT)
        assert [o.kind for o in crashed] == ["ok", "crash", "ok"], crashed.summary()
        after = eng.map(_tasks.cwd_of, range(4), timeout=WAIT)
        assert len(after.successful) == 4, after.summary()
        assert set(after.values) == {f"{here} (deleted)"}


def test_without_proc_the_error_names_the_deleted_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``/proc/<pid>/cwd`` is not there, a worker start says which directory went."""
    from stagepool._backends._local import _cwd

    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _cwd.workers_directory() == str(here)
    os.rmdir(here)
    assert _cwd.workers_directory() == f"/proc/{os.getpid()}/cwd"
    with pytest.raises(FileNotFoundError, match=f"{here} .*was deleted"):
        _cwd.workers_directory(proc=str(tmp_path / "no-proc"))  # as on a system without /proc


def test_workers_get_our_pythonpath_made_absolute(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from stagepool._backends._local import _cwd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", "/abs/lib", ""]))
    env = _cwd.with_absolute_pythonpath({"OMP_NUM_THREADS": "1"})
    assert env == {"OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), "/abs/lib", ""])}
    assert _cwd.with_absolute_pythonpath({"PYTHONPATH": "mine"}) == {"PYTHONPATH": "mine"}
    monkeypatch.delenv("PYTHONPATH")
    assert _cwd.with_absolute_pythonpath({}) == {}


def test_a_killed_resource_tracker_does_not_stop_the_engine() -> None:
    """loky relaunches its resource tracker when it starts a worker, with a UserWarning: under
    warnings-as-errors it raised out of the pool thread, which closed the engine and cancelled
    the rest of the batch."""
    from loky.backend import resource_tracker

    with sp.Engine(workers=1, chunk_size=1) as eng:
        _end_template(eng)
        assert eng.map(_tasks.hard_exit, [0, 1], timeout=WAIT).values == [1]  # loky starts one
        tracker = resource_tracker._resource_tracker
        assert tracker._pid is not None
        os.kill(tracker._pid, signal.SIGKILL)
        os.waitpid(tracker._pid, 0)
        report = eng.map(_tasks.hard_exit, [1, 0, 2], timeout=WAIT)
        assert [o.kind for o in report] == ["ok", "crash", "ok"], report.summary()
