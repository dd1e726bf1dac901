"""Start-up stays cheap: what ``import stagepool`` and a first batch import, and how fast a
replacement worker takes its first item (issue 15). Timings live in ``benchmarks/startup.py``;
these tests pin the causes (imports, process ancestry), never durations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import _startup_tasks
import stagepool as sp
from conftest import WAIT, wait_until

KILL_GRACE = 0.5  # seconds between the SIGTERM and the SIGKILL of a timed-out worker
HEAVY = ("numpy", "psutil", "loky", "asyncio")
# Imported at first use: the progress bar, the cluster backend, the pipeline layer's flow.
LATER = ("tqdm", "distributed", "stagepool._pipeline._flow", "stagepool._backends._dask")


def _imported_after(code: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    probe = f"{code}\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", f"import sys\n{probe}"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_import_and_engine_class_import_nothing_heavy() -> None:
    assert _imported_after("import stagepool; stagepool.Engine", HEAVY + LATER) == []


def test_a_first_batch_without_arrays_imports_neither_numpy_nor_psutil() -> None:
    code = ("import stagepool\n"
            "with stagepool.Engine(workers=1) as engine:\n"
            "    assert engine.map(abs, range(-5, 5)).values == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]")
    imported = _imported_after(code)
    assert "numpy" not in imported
    assert "psutil" not in imported  # the plan reads /proc/meminfo itself (~15 ms of start-up)
    assert "loky" not in imported  # the workers are forked from the template
    assert "asyncio" not in imported  # the async calls import it, when awaited


def _template_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "stagepool._template" in " ".join(_cmdline(p))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_workers_are_forked_warm_from_the_template_with_the_preloaded_modules() -> None:
    with sp.Engine(workers=1, preload=("_startup_tasks",), timeout=1.0) as engine:
        report = engine.map(_startup_tasks.hang_first, [1, 0, 2], chunk_size=1)
        assert [o.kind for o in report] == ["ok", "timeout", "ok"]
        first_imported, first, parent = report[0].value
        again_imported, again, again_parent = report[2].value
        assert first != again  # the timeout killed the first worker
        assert parent == again_parent != os.getpid()  # both forked by the one template ...
        assert first_imported == again_imported == parent  # ... which imported the module once


def test_forked_workers_draw_their_own_random_numbers() -> None:
    with sp.Engine(workers=2, preload=("numpy.random", "random")) as engine:
        values = engine.map(_startup_tasks.draws, range(4), chunk_size=1).values
    by_worker = {pid: (a, b) for pid, a, b in values}
    assert len(by_worker) == 2, values
    first, second = by_worker.values()
    assert first[0] != second[0] and first[1] != second[1]


def test_a_killed_caller_leaves_no_template_and_no_worker() -> None:
    code = ("import stagepool as sp, sys, time\n"
            "engine = sp.Engine(workers=2)\n"
            "print(engine.worker_pids(), flush=True)\n"
            "time.sleep(1000)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        workers = eval(proc.stdout.readline())
        family = _template_children(proc.pid)
        assert {p.pid for p in family} > set(workers)  # the workers and their template
    finally:
        proc.kill()
        proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                      for p in family), timeout=10)


def test_shutdown_stops_the_template() -> None:
    engine = sp.Engine(workers=1)
    assert engine.map(abs, [-1]).values == [1]
    workers = [psutil.Process(pid) for pid in engine.worker_pids()]
    family = [*workers, *(worker.parent() for worker in workers)]  # and their template
    assert all(p is not None and "stagepool._template" in " ".join(_cmdline(p)) for p in family)
    engine.shutdown()
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                      for p in family), timeout=10)


def test_preload_is_checked_at_the_door() -> None:
    with pytest.raises(TypeError, match="preload must be a tuple"):
        sp.Engine(preload="numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preload: 'no such' is not a module name"):
        sp.Engine(preload=("no such",))


def test_the_replacement_starts_while_a_timed_out_worker_dies(tmp_path: Path) -> None:
    # The hung worker ignores SIGTERM: it dies at the SIGKILL after the kill's 0.5 s grace. Its
    # replacement is started when the kill begins (it used to be started after the burial, so
    # at least 0.5 s after the deadline).
    started, births = tmp_path / "started", tmp_path / "births"
    with sp.Engine(workers=1, timeout=1.0, initializer=_startup_tasks.note_start,
                   initargs=(str(births),)) as engine:
        report = engine.map(_startup_tasks.hang_ignoring_sigterm, [str(started)])
    assert report[0].kind == "timeout", report[0]
    deadline = float(started.read_text()) + 1.0
    # The second birth: the spare forked ahead (before the deadline), then a new spare.
    replacement = sorted(map(float, births.read_text().split()))[1]
    assert replacement - deadline < KILL_GRACE
