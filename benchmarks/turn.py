"""Do items that turn slow after tiny ones spread over the workers? (issue 15)

3,000 tiny items (``spin(0)``: a call and a clock read) then 300 of 10 ms (``spin(0.01)``: CPU,
not sleep), mapped as one list on 2 workers. A pool that sizes chunks from the start of a batch
sends the slow tail to one worker: ``multiprocessing.Pool.map``'s default chunks (~410 items)
hold all 300 slow items in one or two chunks. stagepool plans the list blind (tiny items) with a
20 ms budget per chunk; the budget must cut the chunk right after the turn, or one worker runs
the slow rest alone. The ideal is the slow items' work split evenly: 1.5 s.

    python -m benchmarks.turn [--rounds 5] [--out DIR]

Rows: ``stagepool`` (Engine.map, chunk_size "auto"), ``mp`` (multiprocessing.Pool.map, its
default chunks), ``ppe-1`` (ProcessPoolExecutor.map, chunksize=1: balanced, a round trip per
item). Rounds run the pools interleaved (each meets the same load); the metric is the median
makespan / ideal, and for stagepool the slow items each worker ran (from the outcomes). Prints a
table, writes ``turn.json``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stagepool as sp

from .tiny_ab import interleaved
from .workloads import spin

WORKERS = 2
TINY, SLOW, SLOW_S = 3000, 300, 0.01


def _pools(stack: list[Callable[[], object]], split: list[list[int]]) -> dict[str, Any]:
    pool = multiprocessing.get_context("fork").Pool(WORKERS)
    ppe = concurrent.futures.ProcessPoolExecutor(WORKERS)
    engine = sp.Engine(workers=WORKERS, chunk_size="auto")
    stack.extend([pool.terminate, ppe.shutdown, engine.shutdown])

    def stagepool_map(xs: list[float]) -> list[float]:
        report = engine.map(spin, xs)
        by_worker = collections.Counter(o.worker for o in report if xs[o.index])
        split.append(sorted(by_worker.values()))
        return report.values

    return {"stagepool": stagepool_map,
            "mp": lambda xs: pool.map(spin, xs),
            "ppe-1": lambda xs: list(ppe.map(spin, xs, chunksize=1))}


def measure(rounds: int) -> tuple[dict[str, list[float]], list[list[int]]]:
    """Seconds per map of each pool over ``rounds`` interleaved rounds (after a warm-up), and
    how stagepool split the slow items between its workers in each timed round."""
    items = [0.0] * TINY + [SLOW_S] * SLOW
    stack: list[Callable[[], object]] = []
    split: list[list[int]] = []
    try:
        pools = _pools(stack, split)
        names = list(pools)
        for name in names:
            assert pools[name](items) == items, name
        split.clear()
        return interleaved(pools, items, rounds), split
    finally:
        for close in reversed(stack):
            close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    ideal = SLOW * SLOW_S / WORKERS
    times, split = measure(args.rounds)
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t),
                   "makespan_over_ideal": statistics.median(t) / ideal} for name, t in times.items()}
    result = {"rows": rows, "stagepool_slow_items_per_worker": split, "ideal_s": ideal,
              "load_before": load, "load_after": os.getloadavg()[0], "rounds": args.rounds}
    print(f"turn: {TINY:,} tiny items then {SLOW} x {SLOW_S * 1e3:.0f} ms, {WORKERS} workers, "
          f"ideal {ideal:.2f} s, {args.rounds} rounds, load {load:.1f} -> "
          f"{result['load_after']:.1f}")
    print(f"{'pool':<12} {'median s':>9} {'min s':>7} {'makespan/ideal':>15}")
    for name, row in rows.items():
        print(f"{name:<12} {row['median_s']:>9.2f} {row['min_s']:>7.2f} "
              f"{row['makespan_over_ideal']:>15.2f}")
    print(f"stagepool's slow items per worker, by round: {split}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "turn.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
