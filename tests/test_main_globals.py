"""A script's initializer sets globals its tasks read, all defined in ``__main__`` (a breaker's
finding: on the local backend every task raised NameError, each by-value function having its
own globals in the worker)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stagepool as sp
from conftest import BACKENDS, WAIT

SRC = str(Path(sp.__file__).resolve().parent.parent)

SCRIPT = """
    import sys
    sys.path.insert(0, {src!r})
    import stagepool as sp

    SCALE = None  # a placeholder the initializer replaces: the worker's value must win


    def init():
        global MODEL, SCALE
        MODEL = lambda x: x * 10  # a model loaded once per worker
        SCALE = 2


    def helper(x):
        return MODEL(x) * SCALE


    def task(x):
        return helper(x) + 1


    def make_adder(x):
        return lambda y: x + y  # a __main__ function travelling back from the worker


    if __name__ == "__main__":
        options = {{}} if sys.argv[1] == "serial" else {{"workers": 2}}
        with sp.Engine(backend=sys.argv[1], initializer=init, **options) as eng:
            report = eng.map(task, range(4))
            print("TASK", report.values, [repr(o.error) for o in report.failed])
            adders = eng.map(make_adder, [5]).values
            print("ADDER", [adder(1) for adder in adders])

            def helper(x):  # redefined, as in a notebook: the new one is what runs
                return -x

            def task_again(x):
                return helper(x)

            print("AGAIN", eng.map(task_again, range(3)).values, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_initializer_globals_are_visible_to_main_tasks(backend: str, tmp_path: Path) -> None:
    if backend == "dask":
        pytest.importorskip("distributed")
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT.format(src=SRC)))
    done = subprocess.run([sys.executable, str(path), backend], capture_output=True, text=True,
                          timeout=3 * WAIT, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["TASK"] == "[1, 21, 41, 61] []", done.stdout
    assert lines["ADDER"] == "[6]", done.stdout
    assert lines["AGAIN"] == "[0, -1, -2]", done.stdout
