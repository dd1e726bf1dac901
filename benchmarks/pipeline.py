"""Does a stagepool pipeline run a multi-stage job as fast as one fused function, faster than
running the stages one after another as whole batches, with the first result early and the
parent's memory independent of the job's length?

A 4-stage pipeline of uneven stages (``pipeline_work``: decode 1x, analyse ~5x, features ~2x,
encode ~1x; 256 KiB intermediates) over N segments, at two sizes, one row per way to run it:

* ``stagepool-pipeline``: ``engine.run_iter(Pipeline of the 4 stages)``: fused per segment
* ``stagepool-stages`` / ``ppe-stages``: each stage as a whole batch (``engine.map`` /
  ``ProcessPoolExecutor.map``), one after another; every intermediate goes back to the parent
* ``stagepool-fused`` / ``ppe-fused``: one function doing all four stages (the ceiling)
* ``pypeln``: ``pl.process.map`` per stage (2 workers each, queues of 4), chained

Every row runs in a fresh process with 2 workers, after an untimed warm-up; it reports wall
time, throughput, time to the first finished segment (its share of the total) and the growth of
the parent's resident memory (anon + shmem, sampled every 5 ms) over its level after warm-up.

    python -m benchmarks.pipeline                  # 250 and 500 segments, 3 runs per row
    python -m benchmarks.pipeline --sizes 40 --repeat 1 --out /tmp/pipe.json   # a smoke run

The rows' runs are interleaved (row 1, row 2, ..., row 1, ...) and the table shows each row's
median run: on a shared machine, only ratios from one such run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import pipeline_work as work

WORKERS = 2
ROWS = ("stagepool-pipeline", "stagepool-stages", "ppe-stages", "stagepool-fused", "ppe-fused",
        "pypeln")


class _Peak:
    """The parent's resident memory (anon + shmem), sampled in a thread."""

    def __init__(self) -> None:
        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def growth(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem")) / 1024


def _timed(results: Iterable[Any]) -> tuple[list[Any], float, float]:
    """Consume ``results``; return them, the time to the first, and the total."""
    start = time.perf_counter()
    first = None
    out = []
    for value in results:
        if first is None:
            first = time.perf_counter() - start
        out.append(value)
    return out, first or 0.0, time.perf_counter() - start


def _stagepool_rows(row: str, n: int) -> tuple[list[Any], float, float, float]:
    import stagepool as sp

    p = sp.Pipeline()
    for i, fn in enumerate(work.STAGES):
        p.stage(fn.__name__, fn, after=() if i == 0 else work.STAGES[i - 1].__name__)
    with sp.Engine(workers=WORKERS) as engine:
        engine.map(work.fused, range(2 * WORKERS), chunk_size=1)
        list(engine.run_iter(p, range(2 * WORKERS)))
        peak = _Peak()
        if row == "stagepool-pipeline":
            got, first, total = _timed(s.value for s in engine.run_iter(p, range(n),
                                                                        ordered=False))
        elif row == "stagepool-fused":
            got, first, total = _timed(o.value for o in engine.imap(work.fused, range(n),
                                                                    ordered=False))
        else:
            got, first, total = _by_stage(lambda fn, xs: engine.map(fn, xs).values, n)
        return got, first, total, peak.growth()


def _by_stage(map_: Callable[[Any, list[Any]], list[Any]], n: int) -> tuple[list[Any], float,
                                                                            float]:
    start = time.perf_counter()
    values: list[Any] = list(range(n))
    for fn in work.STAGES:
        values = list(map_(fn, values))
    total = time.perf_counter() - start
    return values, total, total  # nothing is finished before the last stage's batch returns


def _ppe_rows(row: str, n: int) -> tuple[list[Any], float, float, float]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS) as ex:
        list(ex.map(work.fused, range(2 * WORKERS)))
        peak = _Peak()
        if row == "ppe-fused":
            got, first, total = _timed(ex.map(work.fused, range(n)))
        else:
            got, first, total = _by_stage(lambda fn, xs: ex.map(fn, xs), n)
        return got, first, total, peak.growth()


def _pypeln_row(n: int) -> tuple[list[Any], float, float, float]:
    import pypeln as pl

    def chain(items: Iterable[Any]) -> Any:
        stage = items
        for fn in work.STAGES:
            stage = pl.process.map(fn, stage, workers=WORKERS, maxsize=4)
        return stage

    list(chain(range(2 * WORKERS)))
    peak = _Peak()
    got, first, total = _timed(chain(range(n)))
    return got, first, total, peak.growth()


def run_row(row: str, n: int) -> dict[str, Any]:
    if row.startswith("stagepool"):
        got, first, total, growth = _stagepool_rows(row, n)
    elif row.startswith("ppe"):
        got, first, total, growth = _ppe_rows(row, n)
    else:
        got, first, total, growth = _pypeln_row(n)
    expected = sorted(work.fused(i) for i in range(min(n, 8)))  # a spot check of the values
    assert len(got) == n and all(v in got for v in expected), f"{row}: wrong results"
    return {"row": row, "segments": n, "seconds": total, "per_second": n / total,
            "first_seconds": first, "first_share": first / total, "parent_growth_mib": growth}


def _in_subprocess(row: str, n: int, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))}
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--row", row,
                              "--sizes", str(n)], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"row": row, "segments": n, "error": f"timed out after {timeout:g} s"}
    if out.returncode != 0:
        return {"row": row, "segments": n, "error": out.stderr.strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time (its other figures with it), plus every run's seconds."""
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r["seconds"])
    if not good:
        return runs[-1]
    return {**good[(len(good) - 1) // 2], "all_seconds": [r["seconds"] for r in good]}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'row':<20} {'segments':>8} {'seconds':>8} {'seg/s':>7} {'vs fused':>8} "
             f"{'vs stages':>9} {'first s':>8} {'first %':>8} {'parent MiB':>10}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']:<20} {r['segments']:>8} error: {r['error']}")
            continue
        same = {x["row"]: x for x in results if x["segments"] == r["segments"] and "error" not in x}
        fused = same.get("stagepool-fused", r)["per_second"]
        stages = same.get("stagepool-stages", r)["per_second"]
        lines.append(
            f"{r['row']:<20} {r['segments']:>8} {r['seconds']:>8.2f} {r['per_second']:>7.1f} "
            f"{r['per_second'] / fused:>8.2f} {r['per_second'] / stages:>9.2f} "
            f"{r['first_seconds']:>8.2f} {r['first_share']:>8.1%} "
            f"{r['parent_growth_mib']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,500", help="segment counts, comma-separated")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process (the child)
    parser.add_argument("--out", default="bench-results/pipeline.json")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per row, interleaved across rows; the table shows medians")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.row:
        print(json.dumps(run_row(args.row, sizes[0])))
        return 0
    results = []
    rows = args.rows.split(",")
    for n in sizes:
        runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
        for _ in range(args.repeat):  # interleaved: a load spike hits every row alike
            for row in rows:
                runs[row].append(_in_subprocess(row, n, args.timeout))
                print(table(runs[row][-1:]).splitlines()[-1], flush=True)
        results.extend(_median(runs[row]) for row in rows)
    print(f"\n{WORKERS} workers, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workers": WORKERS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
