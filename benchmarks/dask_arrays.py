"""How fast do big numpy arrays go through stagepool's dask backend, beside dask's own calls?

One in-process ``LocalCluster`` (``--workers`` one-thread worker processes), one function
(``a + 1``: the time is the arrays' travel, not the work) and, side by side in one run, in
alternating rounds: ``client.map(fn, arrays, pure=False)`` + ``client.gather``, stagepool's
``Engine(backend=client).map`` on the same cluster, and (``--joblib``) joblib's dask backend.
Two shapes: a few big arrays (``--big`` x 100 MiB) and many medium ones (``--medium`` x 4 MiB).
Prints the best and median seconds of each row and stagepool's speed as a ratio of
``client.map``'s (> 1: faster), and writes ``dask_arrays.json``.

    python -m benchmarks.dask_arrays [--workers 2] [--rounds 3] [--big 4] [--medium 64]

Memory: the inputs, their results and the copies in flight: about 4 x the inputs at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import stagepool as sp


def inc(a: Any) -> Any:
    return a + 1


def shapes(big: int, medium: int) -> dict[str, list[Any]]:
    """The inputs, random (incompressible, as media mostly is) float64 arrays."""
    rng = np.random.default_rng(0)
    return {f"{big} x 100 MiB": [rng.random(100 * 2**20 // 8) for _ in range(big)],
            f"{medium} x 4 MiB": [rng.random(4 * 2**20 // 8) for _ in range(medium)]}


def timed(run: Callable[[list[Any]], list[Any]], expect: list[Any]) -> float:
    started = time.perf_counter()
    values = run(expect)
    took = time.perf_counter() - started
    assert len(values) == len(expect) and all(
        v.shape == e.shape and v[0] == e[0] + 1 for v, e in zip(values, expect, strict=True))
    return took


def rows(client: Any, engine: sp.Engine, joblib_too: bool) -> dict[str, Callable[[list[Any]], list[Any]]]:
    def dask_map(arrays: list[Any]) -> list[Any]:
        return list(client.gather(client.map(inc, arrays, pure=False)))

    def stagepool_map(arrays: list[Any]) -> list[Any]:
        return list(engine.map(inc, arrays).values)

    out = {"dask client.map+gather": dask_map, "stagepool Engine(backend=client)": stagepool_map}
    if joblib_too:
        import joblib

        def joblib_dask(arrays: list[Any]) -> list[Any]:
            with joblib.parallel_config(backend="dask"):
                return list(joblib.Parallel()(joblib.delayed(inc)(a) for a in arrays))

        out["joblib dask backend"] = joblib_dask
    return out


def measure(client: Any, engine: sp.Engine, inputs: dict[str, list[Any]], rounds: int,
            joblib_too: bool) -> dict[str, dict[str, list[float]]]:
    return alternate(rows(client, engine, joblib_too), inputs, rounds)


def alternate(runs: dict[str, Callable[[list[Any]], list[Any]]], inputs: dict[str, list[Any]],
              rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each row on each shape, ``rounds`` times."""
    times: dict[str, dict[str, list[float]]] = {shape: {row: [] for row in runs} for shape in inputs}
    for shape, arrays in inputs.items():
        for _ in range(rounds):  # alternating rounds: a load change hits every row alike
            for row, run in runs.items():
                times[shape][row].append(timed(run, arrays))
    return times


def show(times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    print(f"{'':24} {'row':36} {'best':>7} {'median':>7} {'vs client.map':>14}")
    for shape, per_row in times.items():
        base = statistics.median(per_row["dask client.map+gather"])
        summary[shape] = {}
        for row, seconds in per_row.items():
            median = statistics.median(seconds)
            summary[shape][row] = {"best_s": min(seconds), "median_s": median,
                                   "speed_vs_client_map": base / median, "runs_s": seconds}
            print(f"{shape:24} {row:36} {min(seconds):6.2f}s {median:6.2f}s {base / median:13.2f}x")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--medium", type=int, default=64)
    parser.add_argument("--joblib", action="store_true", help="also joblib's dask backend")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    # client.map puts big arguments in the task graph: dask warns on every call (its row's cost).
    warnings.filterwarnings("ignore", message="Sending large graph")
    inputs = shapes(args.big, args.medium)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client, sp.Engine(backend=client) as engine:
        summary = show(measure(client, engine, inputs, args.rounds, args.joblib))
    write(args, "dask_arrays.json", summary)


def write(args: argparse.Namespace, name: str, summary: dict[str, Any]) -> None:
    """``summary`` as JSON in ``args.out``/``name``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(
        {"workers": args.workers, "rounds": args.rounds, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
