"""``python -m benchmarks``: run the workloads on stagepool and its peers, print tables, write JSON,
draw plots, and (``--markdown``) write the page BENCHMARKS.md is made of.

For each workload: compute its parameters once in this process (calibration included), then run
every row in its own spawn subprocess (see harness.py), then judge the rows: median and min-max of
the timed runs, the ratio against the ProcessPoolExecutor row of the same run, and stagepool's
targets. ``results.json`` is rewritten after every workload, so an interrupted run keeps its data.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import render, report, suite
from .harness import Job, RawResult, ratio, run_isolated, summarize
from .machine import machine_facts, one_line
from .peers import PEERS, PeerSpec

__all__ = ["build_row", "command_line", "finish_rows", "main", "on_backend", "parse_args",
           "throughput"]

# Rows that always run: stagepool (the targets) and the PPE baseline (the ratios).
ALWAYS = ("stagepool", "ppe")
# A row that other processes disturbed (their share of the CPUs while it ran, CpuMeter) past
# DEFAULT_CALM is measured again, up to CALM_RETRIES more times: on a shared machine one
# tenant's burst moved a row 2x between runs (--calm).
DEFAULT_CALM = 0.05
CALM_RETRIES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="stagepool against its peers, side by side: " + ", ".join(suite.WORKLOADS))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, no warm-up, 1 timed run, every workload and peer "
                             "(about two minutes; the CI smoke run: its numbers are rough)")
    parser.add_argument("--only", type=_names(suite.WORKLOADS), default=None,
                        help=f"comma-separated workloads (default all: {','.join(suite.WORKLOADS)})")
    parser.add_argument("--peers", type=_names(PEERS), default=None,
                        help=f"comma-separated peers ({','.join(PEERS)}); stagepool and the "
                             "ProcessPoolExecutor baseline always run")
    parser.add_argument("--repeat", type=_positive, default=None,
                        help="timed repetitions after one warm-up run (default 5, quick 1)")
    parser.add_argument("--workers", type=_positive, default=2, help="workers per pool (default 2)")
    parser.add_argument("--backend", choices=("local", "dask"), default="local",
                        help="where stagepool's own rows run: local worker processes (default) "
                             "or a dask cluster (the stagepool-dask row always runs on one)")
    parser.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                        help="with --backend dask: the scheduler to use (default: an in-process "
                             "LocalCluster of --workers workers)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for results.json and the PNG plots")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one run (or a pool start) may take before the row is "
                             "killed and reported (default 120, quick 60)")
    parser.add_argument("--calm", type=float, default=None, metavar="SHARE",
                        help=f"measure a row again (up to {CALM_RETRIES} more times, keeping "
                             "the least disturbed attempt) when other processes took more than "
                             f"this share of the CPUs while it ran (default {DEFAULT_CALM}, "
                             "quick: never)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a stagepool target fails")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="also write the results as Markdown to PATH (BENCHMARKS.md), the "
                             "plots linked relative to it")
    args = parser.parse_args(argv)
    if args.address is not None and args.backend != "dask":
        parser.error("--address is the dask scheduler to use: add --backend dask")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 120.0
    if args.calm is None and not args.quick:
        args.calm = DEFAULT_CALM
    return args


def _names(known: dict[str, Any]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}")
        return names
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def on_backend(specs: list[PeerSpec], backend: str, address: str | None) -> list[PeerSpec]:
    """The rows with stagepool's own rows moved to ``backend`` (at ``address``), their labels
    saying so; unchanged for the local backend."""
    if backend == "local":
        return specs
    where = f"dask at {address}" if address else "dask, in-process LocalCluster"
    return [dataclasses.replace(s, label=f"{s.label} [{where}]", options={
        **s.options, "backend": backend, "address": address}) if s.peer == "stagepool" else s
        for s in specs]


def select(specs: list[PeerSpec], peers: list[str] | None) -> list[PeerSpec]:
    """The rows to run: the chosen peers (by adapter name) plus stagepool and the PPE baseline;
    every row when ``peers`` is None. ``--quick`` keeps every peer: the smoke run is there to show
    that each one still gives a row or a reason."""
    if peers is None:
        return specs
    return [s for s in specs if s.peer in peers or s.peer in ALWAYS]


# ---- rows ---------------------------------------------------------------------------------------

def build_row(workload: suite.Workload, spec: PeerSpec, raw: RawResult,
              params: dict[str, Any]) -> dict[str, Any]:
    """One table row from a subprocess's raw result: status, timings, metric."""
    row: dict[str, Any] = {
        "key": spec.key, "peer": spec.peer, "label": spec.label, "status": raw.status,
        "reason": raw.reason, "startup_s": raw.startup_s, "close_s": raw.close_s,
        "runs_s": [r["seconds"] for r in raw.runs],
        "warmup_s": [r["seconds"] for r in raw.warmup], "info": raw.info,
        "left_behind": raw.left_behind, "elapsed_s": raw.elapsed_s, "final": raw.final,
        "median_s": None, "min_s": None, "max_s": None, "metric": None, "metric_text": "",
        "extra": {}, "throughput": None,
    }
    if raw.status == "ok" and not raw.runs:
        row["status"], row["reason"] = "error", "no timed run came back"
    if row["status"] != "ok":
        return row
    stats = summarize(row["runs_s"])
    row.update(median_s=stats.median, min_s=stats.min, max_s=stats.max, n=stats.n)
    row["extra"] = workload.aggregate(raw.warmup, raw.runs)
    row["metric"], row["metric_text"] = workload.metric(row, params)
    row["throughput"] = throughput(workload, row, params)
    return row


def throughput(workload: suite.Workload, row: dict[str, Any],
               params: dict[str, Any]) -> dict[str, Any] | None:
    """Work per second of an ok row, at its median and at its slowest and fastest runs (the plot's
    bar and whisker); None when the workload gives no amount of work for the row."""
    work = workload.work(row, params)
    if work is None:
        return None
    amount, unit = work
    return {"unit": unit, "per_s": amount / row["median_s"], "low": amount / row["max_s"],
            "high": amount / row["min_s"]}


def finish_rows(workload: suite.Workload, rows: list[dict[str, Any]],
                params: dict[str, Any]) -> list[dict[str, Any]]:
    """Derived rows, ratios against this run's PPE baseline, and stagepool's targets."""
    rows = workload.derive(rows)
    by_key = {r["key"]: r for r in rows}
    base = by_key.get(workload.baseline)
    base_s = _ratio_seconds(workload, base) if base else None
    for row in rows:
        row["vs_ppe"] = ratio(base_s, _ratio_seconds(workload, row))
    for row in rows:
        if row["peer"] != "stagepool" or row.get("derived") or not workload.judged(row):
            continue
        row["targets"] = []
        for target in workload.targets(params):
            if not target.applies(row):
                continue
            passed, detail = (target.check(row, by_key) if row["status"] == "ok"
                              else (False, row["status"]))
            row["targets"].append({"text": target.text, "pass": passed, "detail": detail})
        verdicts = [t["pass"] for t in row["targets"]]
        row["result"] = ("FAIL" if False in verdicts else "PASS" if verdicts and None not in
                         verdicts else "?" if verdicts else "")
    return rows


def _ratio_seconds(workload: suite.Workload, row: dict[str, Any]) -> float | None:
    return workload.ratio_seconds(row) if row["status"] == "ok" else None


# ---- main ---------------------------------------------------------------------------------------

def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workload = suite.get(name)
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    params = {**workload.params(args.quick), "workers": args.workers}
    rows = []
    specs = on_backend(workload.specs(params), args.backend, args.address)
    for spec in select(specs, args.peers):
        foreign: float | None = None
        if spec.na is not None:
            raw = RawResult(status="n/a", reason=spec.na)
        else:
            warmup, repeat = workload.schedule(spec, args.repeat)
            warmup = 0 if args.quick else warmup  # a smoke run: the start-up probe warms up
            _progress(f"{name}/{spec.key}: {warmup} warm-up + {repeat} timed")
            job = Job(name, spec.to_json(), params, args.workers, repeat, warmup,
                      run_timeout=args.timeout, start_timeout=args.timeout)
            raw, foreign, tries = _calm_run(job, args.calm)
            _progress(f"  -> {raw.status} in {raw.elapsed_s:.1f} s")
        row = build_row(workload, spec, raw, params)
        row["foreign_cpu"] = foreign
        row["measured"] = tries if spec.na is None else 0
        # 1-minute load average after the row: our own workers add about `workers`; more than
        # that means other processes competed for the cores while this row ran.
        row["loadavg_after"] = os.getloadavg()[0]
        rows.append(row)
    rows = finish_rows(workload, rows, params)
    load = f"load {load_start:.1f} -> {os.getloadavg()[0]:.1f}"
    facts = workload.facts(params)
    return {"question": workload.question(), "doc": (type(workload).__doc__ or "").strip(),
            "params": params, "facts": f"{facts}; {load}" if facts else load, "rows": rows,
            "elapsed_s": time.perf_counter() - began}


def _calm_run(job: Job, calm: float | None) -> tuple[RawResult, float, int]:
    """Run a row; while other processes took more than ``calm`` of the CPUs meanwhile (the
    machine is shared), run it again, up to CALM_RETRIES more times, and keep the attempt they
    disturbed least (whatever its times). Returns it, its foreign share and the attempts made."""
    kept: tuple[RawResult, float] | None = None
    tries = 0
    while True:
        tries += 1
        meter = CpuMeter()
        raw = run_isolated(job)
        foreign = meter.foreign_share()
        if kept is None or foreign < kept[1]:
            kept = raw, foreign
        if calm is None or foreign <= calm or tries > CALM_RETRIES or raw.status != "ok":
            return *kept, tries
        _progress(f"  .. other processes took {foreign:.0%} of the CPUs: measured again")


class CpuMeter:
    """How much of the machine's CPU went to processes outside the harness while a row ran.

    System-wide busy time (psutil) minus what this process and its waited-for descendants used
    (``os.times``). Workers a pool never waits for are not credited to us, so this errs high; on
    an otherwise idle machine it reads a few percent. A row with a big share ran on a noisy box.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._began = time.perf_counter()
        self._busy = self._system_busy()
        self._ours = self._own()

    def _system_busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def foreign_share(self) -> float:
        """Foreign busy CPU seconds / (cpus x elapsed seconds), clamped to [0, 1]."""
        elapsed = time.perf_counter() - self._began
        foreign = (self._system_busy() - self._busy) - (self._own() - self._ours)
        cpus = self._psutil.cpu_count() or 1
        return min(1.0, max(0.0, foreign / (cpus * elapsed))) if elapsed > 0 else 0.0


def _progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def command_line(argv: list[str]) -> str:
    """The command that reproduces a run, as a reader would type it."""
    import shlex

    return " ".join(["python -m benchmarks", *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    names = args.only or list(suite.WORKLOADS)
    facts = machine_facts()
    print(f"machine: {one_line(facts)}", flush=True)
    results: dict[str, Any] = {
        "machine": facts,
        "settings": {"quick": args.quick, "repeat": args.repeat, "warmup": 0 if args.quick else 1,
                     "workers": args.workers, "backend": args.backend, "address": args.address,
                     "timeout_s": args.timeout, "only": names,
                     "peers": args.peers, "calm": args.calm, "argv": argv,
                     "command": command_line(argv)},
        "method": ("each row runs in a fresh spawn subprocess: pool started once (timed apart as "
                   "start s, including a trivial probe batch), one warm-up run, then the timed "
                   "repeats (a workload may change that: see its facts); median and min-max of "
                   "the timed runs; vs PPE = PPE median / row median from the same harness run "
                   "(higher is faster)" + ("" if args.calm is None else
                   f"; a row during which other processes took more than {args.calm:.0%} of the "
                   f"CPUs was measured again (at most {CALM_RETRIES} more times) and the least "
                   "disturbed attempt kept")),
        "workloads": {},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    out = args.out / "results.json"
    started = time.perf_counter()
    failed_targets = False
    for name in names:
        block = run_workload(name, args)
        results["workloads"][name] = block
        print("\n" + report.format_workload(name, block["question"], block["rows"],
                                            block["facts"]), flush=True)
        failed_targets |= any(r.get("result") == "FAIL" for r in block["rows"])
        report.write_json(out, results)
    facts["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.perf_counter() - started
    results["plots"] = report.write_plots(args.out, results["workloads"])
    report.write_json(out, results)
    print(f"\nwrote {out} and {len(results['plots'])} plots in {args.out} in "
          f"{results['elapsed_s']:.0f} s (load {facts['loadavg_start'][0]:.2f} -> "
          f"{facts['loadavg_end'][0]:.2f})")
    if args.markdown is not None:
        render.write_markdown(args.markdown, results, args.out)
        print(f"wrote {args.markdown}")
    return 1 if args.check and failed_targets else 0
