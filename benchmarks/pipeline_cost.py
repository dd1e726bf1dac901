"""Does ``cost=`` on a pipeline run shorten a job of uneven segments whose long ones come last?

Two stages (``pipeline_work.decode_sized`` -> ``analyse_sized``) over 80 short segments (1 unit
of analysis each) followed by 3 long ones (40 units each), on one engine of 2 workers, one row
per way to admit them:

* ``input-order``: ``engine.run(p, items)``: the long segments start last, and the run ends on
  one of them while the other worker idles (ideal 100 units per worker; this ends near 120)
* ``cost-longest-first``: ``engine.run(p, items, cost=lambda item: item[1])``: the long ones
  start first and the short ones fill in around them (close to the ideal)

Both rows run in the same process, interleaved (row 1, row 2, row 1, ...); the table shows each
row's median wall time and its ratio to input order. On a shared machine only that ratio means
anything.

    python -m benchmarks.pipeline_cost                     # 3 runs per row
    python -m benchmarks.pipeline_cost --repeat 1 --out /tmp/cost.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import pipeline_work as work

WORKERS = 2
SHORT, LONG, LONG_UNITS = 80, 3, 40


def items() -> list[tuple[int, int]]:
    """The short segments first, the long ones last: input order's worst case."""
    return [(i, 1) for i in range(SHORT)] + [(SHORT + i, LONG_UNITS) for i in range(LONG)]


def _units(item: tuple[int, int]) -> int:
    return item[1]


def measure(repeat: int) -> dict[str, list[float]]:
    import stagepool as sp

    p = sp.Pipeline().stage("decode", work.decode_sized)
    p.stage("analyse", work.analyse_sized, after="decode")
    rows: dict[str, dict[str, Any]] = {"input-order": {}, "cost-longest-first": {"cost": _units}}
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    with sp.Engine(workers=WORKERS) as engine:
        engine.run(p, [(0, 1)] * (2 * WORKERS))  # warm-up: workers started, modules imported
        for _ in range(repeat):
            for row, options in rows.items():
                start = time.perf_counter()
                report = engine.run(p, items(), **options)
                seconds[row].append(time.perf_counter() - start)
                assert report.ok and len(report) == SHORT + LONG, f"{row}: {report.summary()}"
    return seconds


def table(seconds: dict[str, list[float]]) -> str:
    base = statistics.median(seconds["input-order"])
    lines = [f"{'row':<20} {'median s':>9} {'vs input order':>15}  runs"]
    for row, runs in seconds.items():
        median = statistics.median(runs)
        lines.append(f"{row:<20} {median:>9.2f} {median / base:>15.2f}  "
                     f"{', '.join(f'{s:.2f}' for s in runs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per row, interleaved")
    parser.add_argument("--out", default="bench-results/pipeline_cost.json")
    args = parser.parse_args(argv)
    seconds = measure(args.repeat)
    print(f"{WORKERS} workers, {SHORT} segments of 1 unit then {LONG} of {LONG_UNITS}; "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(seconds))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workers": WORKERS, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
