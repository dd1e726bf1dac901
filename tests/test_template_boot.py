"""The template started at the first access to ``stagepool.Engine`` (``_template_boot``): the
first local engine adopts it only when it is what that engine would have started; otherwise, with
another backend, or when nobody comes, it goes. Each case runs in a fresh interpreter (an early
start happens once per process), and checks process ancestry and environments, never timings."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import wait_until

_PRELUDE = """
import os, time
import psutil
import stagepool as sp
from stagepool import _template_boot as boot
sp.Engine  # the first access: the template starts now
early = boot._early.process
def parent_of_worker(engine):
    return psutil.Process(engine.worker_pids()[0]).ppid()
def gone(process):
    try:
        process.wait(30)
    except Exception:
        return False
    return True
"""


def _run(body: str, env: dict[str, str] | None = None) -> Any:
    """Run ``body`` after the prelude in a new interpreter; its last printed line, evaluated."""
    code = _PRELUDE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a printed tuple of plain values


def test_the_first_local_engine_adopts_the_template_started_early() -> None:
    adopted, budget = _run("""
        with sp.Engine(workers=1) as engine:
            [seen] = engine.map(os.getenv, ["STAGEPOOL_WORKER_THREADS"]).values
            print((parent_of_worker(engine) == early.pid,
                   seen == engine.plan.thread_env(workers=1)["STAGEPOOL_WORKER_THREADS"]))
        """)
    assert adopted  # its workers are the early template's children ...
    assert budget  # ... and see the thread budget it got in its hello, not at its start


@pytest.mark.parametrize("change", ["os.environ['STAGEPOOL_TEST_EARLY'] = 'changed'",
                                    "os.chdir('/')"])
def test_a_template_started_before_a_change_is_replaced(change: str) -> None:
    replaced, closed, env, cwd = _run(f"""
        {change}
        with sp.Engine(workers=1) as engine:
            values = engine.map(os.getenv, ["STAGEPOOL_TEST_EARLY"]).values
            cwd = engine.map(lambda _: os.getcwd(), [0]).values
            print((parent_of_worker(engine) != early.pid, gone(early),
                   values == [os.getenv("STAGEPOOL_TEST_EARLY")], cwd == [os.getcwd()]))
        """)
    assert replaced and closed  # the early one was not what the engine would start: closed
    assert env and cwd  # the workers run in the engine's environment and directory


def test_a_template_started_before_sys_executable_changed_is_replaced(tmp_path: Path) -> None:
    """A virtualenv-like switch of ``sys.executable`` after the import (issue 15 attack): the
    workers ran the interpreter the template started with; they now run the new one."""
    link = tmp_path / "python"
    link.symlink_to(sys.executable)
    # A link to a virtualenv's python outside the venv starts the base interpreter without the
    # venv's packages: give it them on PYTHONPATH (from the start, so no later change of the
    # environment is what replaces the template)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*site.getsitepackages(), *filter(None, [os.environ.get("PYTHONPATH")])])}
    replaced, executable = _run(f"""
        import sys
        sys.executable = {str(link)!r}
        with sp.Engine(workers=1) as engine:
            seen = engine.map(lambda _: __import__("sys").executable, [0]).values
            print((parent_of_worker(engine) != early.pid, seen == [sys.executable]))
        """, env)
    assert replaced and executable


def test_another_backend_closes_the_template_started_early() -> None:
    assert _run("""
        with sp.Engine(backend="serial") as engine:
            engine.map(abs, [1])
        print((gone(early), early.returncode))
        """) == (True, -9)


def test_a_template_nobody_adopts_exits_on_its_own_and_a_later_engine_starts_another() -> None:
    code = """
        import stagepool as sp, time
        from stagepool import _template_boot as boot
        boot.EARLY_IDLE = 0.5
        sp.Engine
        early = boot._early.process
        early.wait(30)  # it waited 0.5 s for an engine, then left by itself
        with sp.Engine(workers=1) as engine:
            print((early.returncode, engine.map(abs, [-2]).values))
        """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip().splitlines()[-1]) == (0, [2])


# Inside a worker (a stage that builds its own engine), or turned off by the user.
@pytest.mark.parametrize("setting", ["STAGEPOOL_WORKER_THREADS=1", "STAGEPOOL_EARLY_TEMPLATE=0"])
def test_nothing_starts_early_inside_a_worker_or_when_turned_off(setting: str) -> None:
    var, value = setting.split("=")
    code = ("import os, stagepool as sp\nfrom stagepool import _template_boot as boot\n"
            f"os.environ[{var!r}] = {value!r}\nsp.Engine\nprint(boot._early is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_a_refused_engine_closes_the_template_started_early() -> None:
    assert _run("""
        try:
            sp.Engine(workers=0)
        except ValueError:
            pass
        print((gone(early), len(psutil.Process().children(recursive=True))))
        """) == (True, 0)


def test_a_template_started_early_leaves_with_a_sigkilled_caller(tmp_path: Path) -> None:
    """The caller dies before any Engine (SIGKILL: no atexit): the template, waiting for its
    hello, sees its socket close and exits; nothing is left running."""
    code = textwrap.dedent("""
        import os, signal, stagepool as sp
        from stagepool import _template_boot as boot
        sp.Engine
        print(boot._early.process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    # A file, not a pipe: the template inherits it, and a pipe would hold run() until it exits.
    with open(tmp_path / "out", "w+") as out:
        done = subprocess.run([sys.executable, "-c", code], stdout=out,
                              stderr=subprocess.DEVNULL, timeout=120)
        out.seek(0)
        pid = int(out.read().split()[0])
    assert done.returncode == -9
    # well before its 30 s idle limit: it saw the socket close, it did not time out
    assert wait_until(lambda: not _running(pid), timeout=10), f"template {pid} still runs"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
