"""Rows that need a fresh interpreter each: start-up, respawn and first-outcome timings.

Each row is a small script (the peer's own idiomatic calls) run with ``python -c`` in a new
process; it prints one JSON line of measurements as its last line. Rows run round-robin, one
repeat of every row before the next repeat, so that all of them share the machine's load. The
environment lets Python write bytecode (to a temporary cache, not the source tree), and every
row runs once untimed first: a user's installed packages have their ``.pyc`` files, and a
benchmark must not charge stagepool (or a peer) for compiling its sources on every run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Row", "median_table", "run_rows", "write_json"]

ROOT = str(Path(__file__).resolve().parents[1])


class Row:
    """One peer's script: it prints a JSON object of measurements as its last line."""

    def __init__(self, name: str, what: str, code: str) -> None:
        self.name, self.what, self.code = name, what, code


def _env(cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = cache
    src = str(Path(ROOT) / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, src, env.get("PYTHONPATH")) if p)
    return env


def _run(row: Row, env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    try:
        out = subprocess.run([sys.executable, "-c", row.code], capture_output=True, text=True,
                             timeout=timeout, env=dict(env), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_rows(rows: list[Row], repeat: int, timeout: float,
             progress: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Every row once untimed, then ``repeat`` rounds; a row that failed is not run again."""
    results: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="stagepool-bench-pyc-") as cache:
        env = _env(cache)
        failed: set[str] = set()
        for round_ in range(repeat + 1):
            for row in rows:
                if row.name in failed:
                    continue
                got = _run(row, env, timeout)
                if "error" in got:
                    failed.add(row.name)
                    results[row.name] = [got]
                    progress(f"  {row.name}: {got['error']}")
                elif round_ > 0:
                    results[row.name].append(got)
    return results


def median_table(title: str, rows: list[Row], results: dict[str, list[dict[str, Any]]],
                 columns: list[tuple[str, str, str]], base: tuple[str, str] | None = None) -> str:
    """A text table of medians (min-max); ``columns``: (key, header, format);
    ``base``: (row name, key) that the last column divides by."""
    head = f"{'row':30} " + " ".join(f"{h:>18}" for _, h, _ in columns)
    base_value = None
    if base is not None:
        values = [r[base[1]] for r in results.get(base[0], []) if base[1] in r]
        base_value = statistics.median(values) if values else None
        head += f" {'vs ' + base[0]:>16}"
    lines = [title, head]
    for row in rows:
        runs = results[row.name]
        if runs and "error" in runs[0]:
            lines.append(f"{row.name:30} failed: {runs[0]['error'][:90]}")
            continue
        cells = []
        for key, _, fmt in columns:
            values = [r[key] for r in runs if r.get(key) is not None]
            cells.append(f"{_cell(values, fmt):>18}")
        line = f"{row.name:30} " + " ".join(cells)
        if base is not None and base_value:
            mine = [r[base[1]] for r in runs if base[1] in r]
            line += f" {statistics.median(mine) / base_value:15.2f}x" if mine else ""
        lines.append(line)
    return "\n".join(lines)


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def write_json(out: str, name: str, data: dict[str, Any]) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_text(json.dumps(data, indent=2))
    return target
