"""Is stagepool's tiny-item path as fast as multiprocessing.Pool.map, on a loaded machine? (issue 15)

The ``tiny`` workload of the harness runs each pool in its own process, one after the other (5
timed bursts of maps each): on a machine shared with other jobs the load can move between rows
by more than the difference being measured (with one map per timed run, the same stagepool row
measured 0.3 to 1.0 us/item in three runs). This script runs the pools *interleaved*, in one
process: each round maps 20,000 ``x * 2`` once on every pool, in a rotating order, so that every
pool meets the same load; the ratios are the medians of the per-round ratios.

    python -m benchmarks.tiny_ab [--rounds 60] [--items 20000] [--out DIR]

Rows: ``mp`` (multiprocessing.Pool.map, its default chunks), ``ppe-512`` (ProcessPoolExecutor.map
chunksize=512, its best here), ``stagepool`` (Engine.map, chunk_size "auto"), ``stagepool-timeout``
(the same with timeout=60). Targets: stagepool >= 1.0x mp and >= 2x ppe-512; the timeout costs
<= 10%. Prints a table, writes ``tiny_ab.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stagepool as sp

from .workloads import double

WORKERS = 2


def _pools(stack: list[Callable[[], object]]) -> dict[str, Callable[[list[int]], list[int]]]:
    pool = multiprocessing.get_context("fork").Pool(WORKERS)
    ppe = concurrent.futures.ProcessPoolExecutor(WORKERS)
    engine = sp.Engine(workers=WORKERS, chunk_size="auto")
    timed = sp.Engine(workers=WORKERS, chunk_size="auto", timeout=60)
    stack.extend([pool.terminate, ppe.shutdown, engine.shutdown, timed.shutdown])
    return {
        "mp": lambda xs: pool.map(double, xs),
        "ppe-512": lambda xs: list(ppe.map(double, xs, chunksize=512)),
        "stagepool": lambda xs: engine.map(double, xs).values,
        "stagepool-timeout": lambda xs: timed.map(double, xs).values,
    }


def measure(rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per map of each pool, ``rounds`` interleaved rounds after one warm-up each."""
    items = list(range(n))
    stack: list[Callable[[], object]] = []
    try:
        pools = _pools(stack)
        names = list(pools)
        for name in names:  # warm-up: workers started, function cached
            assert pools[name](items) == [2 * x for x in items], name
        return interleaved(pools, items, rounds)
    finally:
        for close in reversed(stack):
            close()


def interleaved(pools: dict[str, Callable[[Any], object]], items: Any,
                rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each pool on ``items``, ``rounds`` rounds in a rotating order, so that
    every pool meets the same load."""
    names = list(pools)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            began = time.perf_counter()
            pools[name](items)
            times[name].append(time.perf_counter() - began)
    return times


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of time(b) / time(a): how many times faster ``a`` is than ``b``
    (paired by round, so that a load that moves between rounds cancels out)."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))


def summarize(times: dict[str, list[float]], n: int) -> dict[str, Any]:
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t),
                   "us_per_item": statistics.median(t) / n * 1e6} for name, t in times.items()}
    ratios = {"stagepool_vs_mp": _paired(times, "stagepool", "mp"),
              "stagepool_vs_ppe512": _paired(times, "stagepool", "ppe-512"),
              "timeout_cost": _paired(times, "stagepool", "stagepool-timeout") - 1}
    return {"rows": rows, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times = measure(args.rounds, args.items)
    result = summarize(times, args.items)
    result.update(load_before=load, load_after=os.getloadavg()[0], rounds=args.rounds,
                  items=args.items, workers=WORKERS)
    print(f"tiny, interleaved: {args.items:,} x (x * 2), {args.rounds} rounds, {WORKERS} workers, "
          f"load {load:.1f} -> {result['load_after']:.1f}")
    print(f"{'pool':<20} {'median ms':>10} {'min ms':>8} {'us/item':>8}")
    for name, row in result["rows"].items():
        print(f"{name:<20} {row['median_s'] * 1e3:>10.2f} {row['min_s'] * 1e3:>8.2f} "
              f"{row['us_per_item']:>8.2f}")
    r = result["ratios"]
    print(f"stagepool vs mp.Pool.map: {r['stagepool_vs_mp']:.2f}x (target >= 1.0x); vs "
          f"ProcessPoolExecutor chunksize=512: {r['stagepool_vs_ppe512']:.2f}x (target >= 2x); "
          f"timeout=60 costs {r['timeout_cost']:+.0%} (target <= +10%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_ab.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
