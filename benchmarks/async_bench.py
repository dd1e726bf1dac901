"""Does the asyncio bridge keep an event loop responsive, cost nothing in throughput, and share the
workers fairly between concurrent requests?

Three measurements on real worker processes, each against its stated target:

1. Event-loop lag (p50 / p99 / max) while a 20,000-item batch runs, measured by a task that sleeps
   1 ms in a loop and records how late it wakes. stagepool ``await engine.map_async(...)`` against
   the stdlib way: ``loop.run_in_executor(ProcessPoolExecutor, fn, item)`` once per item, gathered.
   The idle loop's lag is shown as the floor. Target: p99 under 5 ms for map_async.
2. Throughput of ``map_async`` against ``map`` for the same batch. Target: within 10%.
3. Fairness: a 100-item request submitted while a 10,000-item request runs. Its completion time
   against the big one's. Target: under 10%.

    python benchmarks/async_bench.py [--quick] [--loop asyncio|uvloop] [--out DIR]

``--quick`` is a smoke run (5,000 and 2,000 items): its fairness ratio is not comparable with the
target, which is defined for a 10,000-item request (a 2,000-item one is over too soon).

Prints a table and writes ``DIR/async.json`` (default: the current folder). Uses only the public
``stagepool`` API, so it can be wired into the benchmark harness as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import stagepool as sp

WORKERS = 2
LAG_ITEM_SECONDS = 50e-6  # tiny items: the worst case for the parent (most results per second)
FAIR_ITEM_SECONDS = 1e-3
REPEATS = 5  # throughput: best of this many runs each, alternating, to damp a noisy machine


def spin(seconds: float) -> float:
    """CPU-bound stand-in for decoding a frame: busy for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


# ---- loop lag ------------------------------------------------------------------------------------


async def _measure_lag(work: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    """Run ``work`` while a probe sleeps 1 ms in a loop; return the probe's lateness in ms."""
    lags: list[float] = []

    async def probe() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.get_running_loop().create_task(probe())
    start = time.perf_counter()
    try:
        await work()
    finally:
        task.cancel()
    wall = time.perf_counter() - start
    q = statistics.quantiles(lags, n=100) if len(lags) >= 2 else [0.0] * 99
    return {"p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": max(lags, default=0) * 1e3,
            "samples": len(lags), "wall_s": wall,
            "lags_ms": [round(lag * 1e3, 3) for lag in lags]}  # the distribution, for plots


async def lag_idle(seconds: float) -> dict[str, float]:
    return await _measure_lag(lambda: asyncio.sleep(seconds))


async def lag_map_async(engine: sp.Engine, n: int) -> dict[str, float]:
    async def work() -> None:
        report = await engine.map_async(spin, [LAG_ITEM_SECONDS] * n)
        assert report.ok

    return await _measure_lag(work)


async def lag_run_in_executor(pool: concurrent.futures.ProcessPoolExecutor, n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()

    async def work() -> None:
        await asyncio.gather(*(loop.run_in_executor(pool, spin, LAG_ITEM_SECONDS) for _ in range(n)))

    return await _measure_lag(work)


# ---- throughput ----------------------------------------------------------------------------------


async def throughput(engine: sp.Engine, n: int) -> dict[str, float]:
    items = [LAG_ITEM_SECONDS] * n
    sync_times, async_times = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        assert (await asyncio.to_thread(engine.map, spin, items)).ok
        sync_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert (await engine.map_async(spin, items)).ok
        async_times.append(time.perf_counter() - start)
    best_sync, best_async = min(sync_times), min(async_times)
    return {"items": n, "map_s": best_sync, "map_async_s": best_async,
            "map_items_per_s": n / best_sync, "map_async_items_per_s": n / best_async,
            "map_async_vs_map": best_sync / best_async}


# ---- fairness ------------------------------------------------------------------------------------


async def fairness(engine: sp.Engine, big_n: int, small_n: int) -> dict[str, float]:
    start = time.perf_counter()
    big = asyncio.create_task(engine.map_async(spin, [FAIR_ITEM_SECONDS] * big_n))
    await asyncio.sleep(min(1.0, big_n * FAIR_ITEM_SECONDS / WORKERS / 10))  # the big one is running
    small_start = time.perf_counter()
    assert (await engine.map_async(spin, [FAIR_ITEM_SECONDS] * small_n)).ok
    small_time = time.perf_counter() - small_start
    assert (await big).ok
    big_time = time.perf_counter() - start
    return {"big_items": big_n, "small_items": small_n, "big_s": big_time, "small_s": small_time,
            "small_vs_big": small_time / big_time}


# ---- report --------------------------------------------------------------------------------------


def machine(loop_impl: str) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_avg_1m": load[0], "loop": loop_impl,
            "stagepool": sp.__version__}


def table(results: dict[str, Any]) -> str:
    lag = results["loop_lag"]
    rows = [("measurement", "result", "target", "met")]
    for name, label in (("idle", "loop lag, idle loop (floor)"),
                        ("map_async", f"loop lag, map_async {lag['items']:,} items"),
                        ("run_in_executor", f"loop lag, run_in_executor x {lag['items']:,}")):
        r = lag[name]
        target = "p99 < 5 ms" if name == "map_async" else ""
        met = ("yes" if r["p99_ms"] < 5 else "NO") if name == "map_async" else ""
        rows.append((label, f"p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} / max {r['max_ms']:.1f} ms"
                     f" ({r['wall_s']:.2f} s)", target, met))
    t = results["throughput"]
    ratio = t["map_async_vs_map"]
    rows.append((f"throughput, {t['items']:,} items",
                 f"map {t['map_items_per_s']:,.0f}/s, map_async {t['map_async_items_per_s']:,.0f}/s"
                 f" ({ratio:.0%} of map)", ">= 90% of map", "yes" if ratio >= 0.9 else "NO"))
    f = results["fairness"]
    rows.append((f"fairness, {f['small_items']} during {f['big_items']:,}",
                 f"small {f['small_s']:.2f} s vs big {f['big_s']:.2f} s ({f['small_vs_big']:.1%})",
                 "< 10%", "n/a (quick)" if results["quick"] else
                 "yes" if f["small_vs_big"] < 0.1 else "NO"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run(quick: bool, loop_impl: str) -> dict[str, Any]:
    lag_n = 5_000 if quick else 20_000
    big_n = 2_000 if quick else 10_000
    results: dict[str, Any] = {"question": __doc__.splitlines()[0] if __doc__ else "",
                               "quick": quick, "machine": machine(loop_impl)}
    async with sp.Engine(workers=WORKERS) as engine:
        await engine.map_async(spin, [LAG_ITEM_SECONDS] * 100)  # warm the workers up
        results["loop_lag"] = {"items": lag_n, "item_seconds": LAG_ITEM_SECONDS,
                               "idle": await lag_idle(1.0 if quick else 2.0),
                               "map_async": await lag_map_async(engine, lag_n)}
        with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
            await asyncio.get_running_loop().run_in_executor(pool, spin, 0.0)  # start the workers
            results["loop_lag"]["run_in_executor"] = await lag_run_in_executor(pool, lag_n)
        results["throughput"] = await throughput(engine, lag_n)
        results["fairness"] = await fairness(engine, big_n, 100)
    results["machine"]["load_avg_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller batches (a CI smoke run)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop implementation (uvloop must be installed)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for async.json")
    args = parser.parse_args(argv)
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(args.quick, args.loop))
    print(table(results))
    print(f"(machine: {results['machine']['cpus']} CPUs, {args.loop} loop, load average "
          f"{results['machine']['load_avg_1m']:.2f} before, "
          f"{results['machine']['load_avg_1m_after']:.2f} after)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "async.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
