"""The single-call workload: ``submit`` one item at a time, and ``run_in_executor`` from asyncio.

A service that hands a pool one request at a time pays the submit path on every call: a future,
a pickle, two pipe trips and the hand-offs between threads. Measured against the executors of the
standard library and loky, in the same run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from . import workloads
from .base import Target, Workload, check, format_rate
from .peers import Peer, PeerSpec

__all__ = ["Submits"]

# Which baseline each stagepool row is judged against: the same way of calling.
_BASELINES = {"stagepool": "ppe", "stagepool-executor": "ppe",
              "stagepool-asyncio": "ppe-asyncio"}


class Submits(Workload):
    """How fast are single calls? 20,000 ``submit(x * 2)`` calls, then every result (and the same
    through ``loop.run_in_executor``), microseconds per call.

    The pattern of a service that hands each request to a pool as it comes. Every call is its own
    round trip to a worker: nothing here can be batched by the caller.
    """

    name = "submits"

    def params(self, quick: bool) -> dict[str, Any]:
        return {"calls": 2_000 if quick else 20_000}

    def facts(self, params: dict[str, Any]) -> str:
        return f"{params['calls']:,} calls, all submitted before the first result is read"

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return [
            PeerSpec("ppe", "ppe", "ProcessPoolExecutor.submit", case={"via": "executor"}),
            PeerSpec("ppe-asyncio", "ppe", "ProcessPoolExecutor via loop.run_in_executor",
                     case={"via": "asyncio"}),
            PeerSpec("loky", "loky", "loky reusable executor .submit", case={"via": "executor"}),
            PeerSpec("stagepool", "stagepool", "stagepool Engine.submit", case={"via": "submit"}),
            PeerSpec("stagepool-executor", "stagepool", "stagepool engine.executor.submit",
                     case={"via": "executor"}),
            PeerSpec("stagepool-asyncio", "stagepool",
                     "stagepool engine.executor via loop.run_in_executor", case={"via": "asyncio"}),
        ]

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return spec.case["via"], list(range(params["calls"]))

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        import time

        via, items = state
        began = time.perf_counter()
        if via == "asyncio":
            values = asyncio.run(_through_loop(peer.executor(), items))
        else:
            submit = peer.engine.submit if via == "submit" else peer.executor().submit  # type: ignore[attr-defined]
            futures = [submit(workloads.double, x) for x in items]
            values = [f.result() for f in futures]
        seconds = time.perf_counter() - began
        check(values == [2 * x for x in items], "every x * 2, in order")
        return {"seconds": seconds, "calls": len(items)}

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        per_call = row["median_s"] / row["extra"]["calls"]
        return per_call * 1e6, f"{per_call * 1e6:.1f} us/call ({format_rate(1 / per_call)})"

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return row["extra"]["calls"], "calls"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def same_way(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            base = rows.get(_BASELINES.get(row["key"], ""))
            if not base or base["status"] != "ok":
                return None, "no baseline row"
            r = base["median_s"] / row["median_s"]
            return r >= 1.0, f"{r:.2f}x {base['key']}"

        return [Target("throughput >= 1.0x ProcessPoolExecutor, called the same way", same_way)]


async def _through_loop(executor: concurrent.futures.Executor, items: list[int]) -> list[int]:
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(executor, workloads.double, x)
                                       for x in items)))
