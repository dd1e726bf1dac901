"""Start-up stays cheap: what ``import stagepool`` and a first batch import, and how fast a
replacement worker takes its first item (issue 15). Timings live in ``benchmarks/startup.py``;
these tests pin the causes (imports, process ancestry), never durations."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("numpy", "psutil", "loky")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", f"import sys\n{probe}"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_import_and_engine_class_import_nothing_heavy() -> None:
    assert _imported_after("import stagepool; stagepool.Engine") == []


def test_a_first_batch_without_arrays_does_not_import_numpy() -> None:
    code = ("import stagepool\n"
            "with stagepool.Engine(workers=1) as engine:\n"
            "    assert engine.map(abs, range(-5, 5)).values == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]")
    assert "numpy" not in _imported_after(code)
