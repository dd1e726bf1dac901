"""What does giving every worker a big read-only table cost? (issue 18.1)

A filterbank or a model's weights (``--mib`` MiB of float32), read whole by every task, handed to
the workers three ways in one run: ``ProcessPoolExecutor(initializer, initargs)`` + a module
global, stagepool's ``initializer``/``initargs`` the same way, and stagepool's
``Engine(shared={...})`` + ``sp.shared(name)``. For each: how long the constructor blocks, the
time to the first answers (every worker has the table), and the memory unique to each worker
(USS, after it read the whole table). Prints a table and writes ``shared_data.json``.

    python -m benchmarks.shared_data [--mib 64] [--workers 2] [--out DIR]

(Its task functions are used from ``benchmarks.shared_data``, never ``__main__``: workers must
import them by reference, so that the initializer's global is the one the tasks read.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import stagepool as sp

_table: Any = None


def keep(table: Any) -> None:
    global _table
    _table = table


def read_global(_: int) -> int:
    float(np.asarray(_table).sum())  # every page
    return os.getpid()


def read_shared(_: int) -> int:
    float(sp.shared("table").sum())
    return os.getpid()


def measure(make: Callable[[], Any], fn: Callable[[int], int], workers: int) -> dict[str, float]:
    started = time.perf_counter()
    pool = make()
    built = time.perf_counter() - started
    try:
        submit = pool.submit
        pids = {f.result(timeout=600) for f in [submit(fn, i) for i in range(4 * workers)]}
        first = time.perf_counter() - started
        uss = [psutil.Process(pid).memory_full_info().uss for pid in pids]
    finally:
        pool.shutdown()
    return {"constructor_s": built, "first_answers_s": first,
            "uss_per_worker_mib": sum(uss) / len(uss) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    from benchmarks import shared_data as me  # by reference in workers, not as __main__

    table = np.ones(args.mib * 2**20 // 4, np.float32)
    n = args.workers
    ways: dict[str, tuple[Callable[[], Executor | sp.Engine], Callable[[int], int]]] = {
        "ProcessPoolExecutor initargs": (
            lambda: ProcessPoolExecutor(n, initializer=me.keep, initargs=(table,)), me.read_global),
        "stagepool initargs": (
            lambda: sp.Engine(workers=n, initializer=me.keep, initargs=(table,)), me.read_global),
        "stagepool shared=": (
            lambda: sp.Engine(workers=n, shared={"table": table}), me.read_shared),
    }
    sp.Engine(workers=1).shutdown()  # the first engine of a process also starts loky's helpers
    results = {name: measure(make, fn, n) for name, (make, fn) in ways.items()}
    print(f"a {args.mib} MiB read-only table for each of {n} workers")
    print(f"  {'':30} {'constructor':>12} {'first answers':>14} {'USS per worker':>15}")
    for name, r in results.items():
        print(f"  {name:30} {r['constructor_s']:11.2f}s {r['first_answers_s']:13.2f}s "
              f"{r['uss_per_worker_mib']:11.0f} MiB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_data.json").write_text(json.dumps(
        {"mib": args.mib, "workers": n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
