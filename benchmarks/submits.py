"""How fast are single submits? 20,000 ``executor.submit(f, i)`` calls, then every result.

The pattern of ``loop.run_in_executor(executor, ...)`` one item at a time. stagepool's
``engine.executor`` against ``concurrent.futures.ProcessPoolExecutor``, same worker count, in one
run; prints a table and writes ``submits.json``.

    python benchmarks/submits.py [--n 20000] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import stagepool as sp


def double(x: int) -> int:
    return x * 2


def rate(executor: Executor, n: int) -> float:
    executor.submit(double, 1).result()  # warm-up
    started = time.perf_counter()
    futures = [executor.submit(double, i) for i in range(n)]
    assert [f.result() for f in futures] == [2 * i for i in range(n)]
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"ProcessPoolExecutor.submit": [], "stagepool engine.executor.submit": []}
    with ProcessPoolExecutor(args.workers) as ppe, sp.Engine(workers=args.workers) as engine:
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            rates["ProcessPoolExecutor.submit"].append(rate(ppe, args.n))
            rates["stagepool engine.executor.submit"].append(rate(engine.executor, args.n))
    base = statistics.median(rates["ProcessPoolExecutor.submit"])
    print(f"{args.n:,} single submits, {args.workers} workers")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:34} {med:10,.0f} items/s  (min {min(values):,.0f}, max {max(values):,.0f})"
              f"  {med / base:.2f}x PPE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "submits.json").write_text(json.dumps({"n": args.n, "workers": args.workers,
                                                  "items_per_second": rates}, indent=2))


if __name__ == "__main__":
    main()
