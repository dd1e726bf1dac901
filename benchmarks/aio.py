"""The async workload: ``async_bench.py``'s measurements run as harness rows, side by side.

The measuring functions are async_bench's own (imported, not copied): the 1 ms loop-lag probe
around a batch, ``throughput`` (map_async against map) and ``fairness`` (a small request during a
big one). This module only chooses, per peer, what the probe runs around, and judges the numbers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import async_bench
from .base import Target, Workload, format_rate
from .peers import Peer, PeerSpec

__all__ = ["Async", "cdf_points", "lag_pebble", "representative_run"]


async def lag_pebble(pool: Any, n: int) -> dict[str, Any]:
    """pebble has no Executor; its per-task futures are ``concurrent.futures.Future``s, so the
    asyncio bridge is ``asyncio.wrap_future`` around ``schedule``: the same shape as
    run_in_executor."""
    async def work() -> None:
        await asyncio.gather(*(asyncio.wrap_future(pool.schedule(
            async_bench.spin, args=(async_bench.LAG_ITEM_SECONDS,))) for _ in range(n)))

    return await async_bench._measure_lag(work)


def representative_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose p99 lag is the median one (the lower middle for an even count): its samples
    stand for the row in the latency plot."""
    ordered = sorted(runs, key=lambda r: r["p99_ms"])
    return ordered[(len(ordered) - 1) // 2]


def cdf_points(samples: list[float], n: int = 1000) -> list[float]:
    """``samples`` sorted and thinned to at most ``n`` evenly spaced order statistics, the smallest
    and the largest kept: the same distribution plot from a results.json of a few kilobytes."""
    ordered = sorted(samples)
    if len(ordered) <= n:
        return ordered
    last = len(ordered) - 1
    return [ordered[round(i * last / (n - 1))] for i in range(n)]


class Async(Workload):
    """Does the event loop stay responsive while a batch runs? Loop lag p50/p99 during a 20,000-item
    batch: map_async against run_in_executor per item; map_async throughput vs map; fairness.

    The probe is a task that sleeps 1 ms in a loop and records how late it wakes (async_bench).
    Items are 50 us busy loops (the worst case for the parent: the most results per second). The
    stagepool row also measures, once, map_async against map on the same batch (best of 5 each,
    alternating) and a 100-item request started during a 10,000-item one (items of 1 ms): its
    time against the big one's.
    """

    name = "async"

    def params(self, quick: bool) -> dict[str, Any]:
        return {"items": 2_000 if quick else 20_000, "big": 1_000 if quick else 10_000,
                "small": 100, "idle_s": 0.5 if quick else 2.0, "quick": quick}

    def facts(self, params: dict[str, Any]) -> str:
        return (f"{params['items']:,} items of {async_bench.LAG_ITEM_SECONDS * 1e6:.0f} us; "
                f"fairness: {params['small']} items during {params['big']:,} (1 ms each); the "
                "physical limit is the idle loop's own lag (first row); the engine.executor row "
                "runs once, without warm-up")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        no_async = "no asyncio API and no Executor"
        return [
            PeerSpec("idle", "serial", f"idle event loop, {params['idle_s']:g} s (the floor)"),
            PeerSpec("ppe", "ppe", "run_in_executor(ProcessPoolExecutor) per item"),
            PeerSpec("mp", "mp", "multiprocessing.Pool",
                     na=f"{no_async}: only apply_async callbacks on the pool's result thread"),
            PeerSpec("loky", "loky", "run_in_executor(loky executor) per item"),
            PeerSpec("joblib", "joblib", "joblib Parallel",
                     na=f"{no_async}: Parallel blocks the calling thread for the whole batch"),
            PeerSpec("mpire", "mpire", "mpire WorkerPool",
                     na=f"{no_async}: map blocks the calling thread for the whole batch"),
            PeerSpec("pebble", "pebble", "pebble schedule + asyncio.wrap_future per item"),
            PeerSpec("dask", "dask", "dask.distributed",
                     na="needs its own Client(asynchronous=True) on the caller's loop; not "
                        "wired into this harness"),
            PeerSpec("stagepool-executor", "stagepool",
                     "run_in_executor(engine.executor) per item", {"how": "executor"}),
            PeerSpec("stagepool", "stagepool", "await engine.map_async (one call)"),
        ]

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        # 20,000 separate submits to stagepool's Executor view take over a minute (and longer on
        # each repetition): one run says it, and repeats would only hit --timeout.
        return (0, 1) if spec.key == "stagepool-executor" else (1, repeat)

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return dict(params)

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        n = state["items"]
        if peer.name == "serial":
            lag = asyncio.run(async_bench.lag_idle(state["idle_s"]))
            n = 0
        elif peer.name == "stagepool" and peer.how != "executor":
            lag = asyncio.run(async_bench.lag_map_async(peer.engine, n))  # type: ignore[attr-defined]
        elif peer.name == "pebble":
            lag = asyncio.run(lag_pebble(peer.pool, n))  # type: ignore[attr-defined]
        else:
            lag = asyncio.run(async_bench.lag_run_in_executor(peer.executor(), n))  # type: ignore[arg-type]
        return {"seconds": lag.pop("wall_s"), "items": n, **lag}

    def final(self, peer: Peer, state: Any) -> dict[str, Any] | None:
        if peer.name != "stagepool" or peer.how == "executor":
            return None
        engine = peer.engine  # type: ignore[attr-defined]

        async def measure() -> dict[str, Any]:
            return {"throughput": await async_bench.throughput(engine, state["items"]),
                    "fairness": await async_bench.fairness(engine, state["big"], state["small"])}

        return asyncio.run(measure())

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        extra["lags_ms"] = cdf_points(representative_run(runs)["lags_ms"])
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        text = f"lag p50 {e['p50_ms']:.2f} / p99 {e['p99_ms']:.2f} / max {e['max_ms']:.1f} ms"
        if e["items"]:
            text += f", {format_rate(e['items'] / row['median_s'])}"
        final = row.get("final") or {}
        if "throughput" in final:
            text += f"; map_async {final['throughput']['map_async_vs_map']:.0%} of map"
        if "fairness" in final:
            text += f"; small/big {final['fairness']['small_vs_big']:.1%}"
        return e["p99_ms"], text

    def ratio_seconds(self, row: dict[str, Any]) -> float | None:
        return row["median_s"] if row["extra"].get("items") else None  # the idle row did no work

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return (row["extra"]["items"], "items") if row["extra"].get("items") else None

    def judged(self, row: dict[str, Any]) -> bool:
        return row["key"] == "stagepool"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def lag(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            p99 = row["extra"]["p99_ms"]
            return p99 < 5.0, f"{p99:.2f} ms"

        def throughput(row: dict[str, Any],
                       rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            t = (row.get("final") or {}).get("throughput")
            if t is None:
                return None, "not measured"
            return t["map_async_vs_map"] >= 0.9, f"{t['map_async_vs_map']:.0%}"

        def fairness(row: dict[str, Any],
                     rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            f = (row.get("final") or {}).get("fairness")
            if f is None:
                return None, "not measured"
            if params.get("quick"):  # the target is defined for a 10,000-item big request
                return None, f"{f['small_vs_big']:.1%}, --quick: not comparable"
            return f["small_vs_big"] < 0.1, f"{f['small_vs_big']:.1%}"

        return [Target("loop lag p99 < 5 ms", lag),
                Target("map_async >= 90% of map", throughput),
                Target(f"{params['small']} during {params['big']:,}: < 10% of its time", fairness)]

