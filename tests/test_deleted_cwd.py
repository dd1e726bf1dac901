"""The working directory deleted while an engine lives: workers that die are replaced, in that
same (deleted) directory, and the engine keeps serving, whether the warm template forks them or
loky starts them (the template gone)."""

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
