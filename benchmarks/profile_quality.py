"""Is the profiler's recommendation as fast as the best configuration an exhaustive sweep finds?

Question: on the demo stage (``stagepool.demo.process_segment``), does
``Engine(**profile.recommended)`` reach at least 95 % of the throughput of the best
(workers, chunk_size) found by trying them all?

Method (standalone, public API only)::

    profile_stage(process_segment, 16 clean segments)        -> recommended (profiling timed)
    one batch of N distinct segments (default 120)
    1. sweep: workers 1 .. usable CPUs x chunk_size 1, 2, 3, 4, 6, 8, 12, 16, "auto", plus
       Engine(**recommended) exactly as configured (its timeout and mem_per_task too);
       `repeat` rounds (default 3), each in a fresh random order, every run in a fresh engine
       (as a user would start it; a worker's history changes its speed); a row's throughput is
       N / its fastest wall time (other load only ever slows a run down)  -> the best rows
    2. head to head: Engine(**recommended) against each of the `top` best rows of the sweep
       (default 2; the sweep's ranking of near-equal rows is noise), `pairs` times (default 12)
       back to back on half a batch, alternating which goes first; ratio against a row = median
       over its pairs of recommended / row throughput; the verdict takes the lowest of these.
       Paired runs share whatever else the machine is doing at that moment, so the ratio holds on
       a busy machine where the sweep's absolute numbers wander by tens of per cent.

Prints the sweep table (best first) and the verdict; writes JSON (``--out``, default
``bench-results/profile_quality.json``). ``--check`` exits 1 when the ratio is under the target.

    python benchmarks/profile_quality.py [--segments N] [--repeat R] [--pairs P] [--top K]
                                         [--quick] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import stagepool as sp
from stagepool.demo import process_segment, soundtrack

TARGET = 0.95
QUESTION = ("On the demo stage, does Engine(**profile.recommended) reach at least 95 % of the "
            "throughput of the best (workers, chunk_size) found by trying them all?")
CHUNK_SIZES: tuple[int | str, ...] = (1, 2, 3, 4, 6, 8, 12, 16, "auto")
QUICK_CHUNK_SIZES: tuple[int | str, ...] = (1, 2, 4, 8, "auto")
REC = 0  # the key of Engine(**recommended) among the engines (the others: their worker count)

Config = tuple[int, int | str]  # (engine key, chunk size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=None,
                        help="segments per timed batch (default 120, quick 60)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="sweep rounds over every configuration (default 3, quick 2)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="head-to-head pairs per contender (default 12, quick 6)")
    parser.add_argument("--top", type=int, default=2,
                        help="contenders: the best rows of the sweep (default 2)")
    parser.add_argument("--sample", type=int, default=16, help="segments the profiler samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sweep's run order")
    parser.add_argument("--quick", action="store_true", help="fewer segments, sizes and rounds")
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile_quality.json"))
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when the recommendation is under {TARGET:.0%} of the best")
    args = parser.parse_args(argv)
    args.segments = args.segments or (60 if args.quick else 120)
    args.repeat = args.repeat or (2 if args.quick else 3)
    args.pairs = args.pairs or (6 if args.quick else 12)
    return args


def segments(count: int) -> list[Any]:
    """``count`` distinct clean 2-second segments (distinct objects: pickling cannot share them)."""
    return list(soundtrack(seconds=2.0 * count, corrupt=()))


class Bench:
    """The batch, and engines made as a user would make them: one per configuration."""

    def __init__(self, recommended: dict[str, Any], items: list[Any]) -> None:
        self.recommended, self.items = recommended, items

    def engine(self, config: Config) -> sp.Engine:
        """A fresh, warm engine for ``config`` (imports and first-call caches done)."""
        engine = (sp.Engine(**self.recommended) if config[0] == REC
                  else sp.Engine(workers=config[0], chunk_size=config[1]))
        engine.map(process_segment, self.items[: 2 * engine.workers], chunk_size=1)
        return engine

    def throughput(self, engine: sp.Engine, items: list[Any] | None = None) -> float:
        batch = self.items if items is None else items
        start = time.perf_counter()
        report = engine.map(process_segment, batch)
        wall = time.perf_counter() - start
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} segments failed: {report.failed[0].error}")
        return len(batch) / wall

    def label(self, config: Config) -> str:
        if config[0] == REC:
            return (f"recommended (workers={self.recommended['workers']}, "
                    f"chunk_size={config[1]})")
        return f"workers={config[0]}, chunk_size={config[1]}"


def sweep(bench: Bench, configs: list[Config], repeat: int, seed: int) -> dict[Config, list[float]]:
    """Throughput of every configuration, ``repeat`` rounds, each in a fresh random order, each
    run in a fresh engine: a worker's history changes its speed (after one big chunk, glibc's
    malloc stops returning big temporaries to the system, and the demo stage gets a third
    faster), so an engine shared between chunk sizes would credit one with another's effect."""
    rng = random.Random(seed)
    done: dict[Config, list[float]] = {c: [] for c in configs}
    for round_ in range(repeat):
        for config in rng.sample(configs, len(configs)):
            with bench.engine(config) as engine:
                done[config].append(bench.throughput(engine))
            print(f"  sweep {round_ + 1}/{repeat} {bench.label(config)}: "
                  f"{done[config][-1]:.1f} segments/s", file=sys.stderr)
    return done


def head_to_head(bench: Bench, rec: Config, other: Config, pairs: int) -> list[float]:
    """Recommended / other throughput of ``pairs`` back-to-back pairs on half a batch each,
    alternating who goes first (short runs: more pairs, each closer together in time). Each side
    keeps its own engine, as a long-running pipeline stage would."""
    half = bench.items[: max(8, len(bench.items) // 2)]
    ratios = []
    with bench.engine(rec) as mine, bench.engine(other) as theirs:
        bench.throughput(mine, half)  # one batch each first: the steady state, not the start
        bench.throughput(theirs, half)
        for i in range(pairs):
            if i % 2 == 0:
                a, b = bench.throughput(mine, half), bench.throughput(theirs, half)
            else:
                b, a = bench.throughput(theirs, half), bench.throughput(mine, half)
            ratios.append(a / b)
            print(f"  pair {i + 1}/{pairs} vs {bench.label(other)}: recommended / it = "
                  f"{ratios[-1]:.3f}", file=sys.stderr)
    return ratios


def table(bench: Bench, done: dict[Config, list[float]]) -> str:
    best = max(max(v) for k, v in done.items() if k[0] != REC)
    lines = [f"{'configuration':<44} {'segments/s':>10} {'vs best':>8} {'median/s':>9} "
             f"{'rounds (segments/s)':>22}"]
    for config, runs in sorted(done.items(), key=lambda kv: -max(kv[1])):
        mark = "  <-" if config[0] == REC else ""
        rounds = " ".join(f"{r:.0f}" for r in runs)
        lines.append(f"{bench.label(config):<44} {max(runs):>10.1f} {max(runs) / best:>8.1%} "
                     f"{statistics.median(runs):>9.1f} {rounds:>22}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    profile = sp.profile_stage(process_segment, segments(args.sample), progress=True)
    profile_seconds = time.perf_counter() - started
    print(profile.summary(), file=sys.stderr)
    recommended = dict(profile.recommended)
    bench = Bench(recommended, segments(args.segments))
    sizes = QUICK_CHUNK_SIZES if args.quick else CHUNK_SIZES
    grid: list[Config] = [(w, c) for w in range(1, sp.plan_workers().cpus + 1) for c in sizes]
    rec: Config = (REC, recommended["chunk_size"])
    print(f"sweep: {len(grid)} configurations + the recommendation, {args.segments} segments "
          f"x {args.repeat} rounds", file=sys.stderr)
    done = sweep(bench, [*grid, rec], args.repeat, args.seed)
    contenders = sorted(grid, key=lambda c: -max(done[c]))[: args.top]
    pairs = {c: head_to_head(bench, rec, c, args.pairs) for c in contenders}
    ratios = {bench.label(c): statistics.median(r) for c, r in pairs.items()}
    worst_label, ratio = min(ratios.items(), key=lambda kv: kv[1])
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(table(bench, done))
    print(f"\nrecommended Engine({', '.join(f'{k}={v!r}' for k, v in recommended.items())})")
    for c, r in pairs.items():
        print(f"head to head vs {bench.label(c)}: median recommended / it = "
              f"{statistics.median(r):.1%} over {len(r)} pairs (range {min(r):.1%}..{max(r):.1%})")
    print(f"verdict: {ratio:.1%} of the best (vs {worst_label}); target >= {TARGET:.0%}: "
          f"{verdict}   (profiling took {profile_seconds:.1f} s)")
    write_json(args.out, {
        "question": QUESTION, "target": TARGET, "ratio": ratio, "verdict": verdict,
        "head_to_head": {bench.label(c): r for c, r in pairs.items()},
        "recommended": recommended, "reasons": profile.reasons, "limited_by": profile.limited_by,
        "profile_seconds": profile_seconds, "segments": args.segments, "repeat": args.repeat,
        "sweep": [{"config": bench.label(c), "workers": recommended["workers"] if c[0] == REC
                   else c[0], "chunk_size": c[1], "recommended": c[0] == REC,
                   "throughput": max(v), "median_throughput": statistics.median(v), "rounds": v}
                  for c, v in done.items()],
        "machine": {"cpus": sp.plan_workers().cpus, "python": platform.python_version(),
                    "platform": platform.platform(), "load_average": _load()},
    })
    print(f"wrote {args.out}")
    return 1 if args.check and ratio < TARGET else 0


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
