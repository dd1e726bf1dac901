"""What does a checkpoint cost, and what does it save when a batch dies at 90%?

On the demo workload (``stagepool.demo``: 2-second 48 kHz stereo segments through
``process_segment``, 300 of them = the demo's 10 minutes), side by side in one run:

1. Journaling cost: ``engine.map`` plain, with ``checkpoint=`` and ``key=`` (the segment's index and
   start), and with ``checkpoint=`` alone (default keys: index + a digest of the segment's
   content, so the parent hashes every segment), each into a fresh directory; repeats alternate.
   Peer: joblib ``Parallel`` plain against a ``joblib.Memory``-cached function (joblib's way to
   not redo work). Target: stagepool's checkpoint costs at most 5% of the plain run.
2. Resume after a kill at 90%: a child process runs the checkpointed batch and SIGKILLs itself
   once 90% of the results have reached it; then the same call runs again here (warm engine, as
   the full run): its time against the full run's. Peer: joblib.Memory, its child killed the
   same way (results counted as ``return_as="generator"`` yields them). Target: at most 15%.

    python -m benchmarks.resume_bench [--quick] [--repeat N] [--out DIR]

Prints a table and writes ``DIR/resume.json``. Uses only the public ``stagepool`` API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stagepool as sp
from stagepool.demo import Segment, process_segment, soundtrack

WORKERS = 2
KILL_AT = 0.9
TARGET_JOURNAL = 0.05
TARGET_RESUME = 0.15
ROOT = Path(__file__).resolve().parent.parent


def segment_key(segment: Segment) -> tuple[int, float]:
    return (segment.index, segment.start_s)


def segments(n: int) -> list[Segment]:
    return list(soundtrack(seconds=2.0 * n, corrupt=()))


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def parent_cpu() -> float:
    """CPU seconds of this process, all its threads (the journal's writer and fsyncs included);
    not its worker processes. On a loaded machine the wall times wobble by more than the 5% target;
    the parent's extra CPU is what journaling takes from the workers on a machine whose cores they
    fill."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_with_cpu(run: Callable[[], Any], cpu: list[float]) -> float:
    before = parent_cpu()
    seconds = timed(run)
    cpu.append(parent_cpu() - before)
    return seconds


# ---- stagepool -----------------------------------------------------------------------------------


def stagepool_rows(engine: sp.Engine, segs: list[Segment], repeat: int, scratch: Path,
                   cpu: dict[str, list[float]]) -> dict[str, list[float]]:
    def fresh() -> Path:
        return Path(tempfile.mkdtemp(dir=scratch))

    runs: dict[str, Callable[[], Any]] = {
        "map": lambda: engine.map(process_segment, segs),
        "map + checkpoint, key=": lambda: engine.map(process_segment, segs,
                                                     checkpoint=fresh(), key=segment_key),
        "map + checkpoint, default keys": lambda: engine.map(process_segment, segs,
                                                             checkpoint=fresh()),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):  # alternating, so drift in the machine's load hits every row alike
        for name, run in runs.items():
            times[name].append(timed_with_cpu(run, cpu.setdefault(name, [])))
    return times


def stagepool_child(checkpoint: str, n: int) -> None:
    """The run that dies: SIGKILL from inside, once 90% of the results are here."""
    segs = segments(n)

    def on_progress(progress: sp.Progress) -> None:
        if progress.done >= KILL_AT * n:
            os.kill(os.getpid(), signal.SIGKILL)

    with sp.Engine(workers=WORKERS) as engine:
        engine.map(process_segment, segs, checkpoint=checkpoint, key=segment_key,
                   on_progress=on_progress)


def stagepool_resume(engine: sp.Engine, segs: list[Segment], scratch: Path) -> dict[str, Any]:
    checkpoint = Path(tempfile.mkdtemp(dir=scratch))
    child(["stagepool", str(checkpoint), str(len(segs))])
    start = time.perf_counter()
    report = engine.map(process_segment, segs, checkpoint=checkpoint, key=segment_key)
    seconds = time.perf_counter() - start
    assert len(report) == len(segs) and report.ok, report.summary()
    return {"seconds": seconds, "restored": report.stats.restored, "ran": report.stats.items}


# ---- joblib.Memory ------------------------------------------------------------------------------


def joblib_rows(segs: list[Segment], repeat: int, scratch: Path) -> dict[str, list[float]]:
    import joblib

    def cached_run() -> None:
        cached = joblib.Memory(tempfile.mkdtemp(dir=scratch), verbose=0).cache(process_segment)
        joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(cached)(s) for s in segs)

    runs: dict[str, Callable[[], Any]] = {
        "joblib Parallel": lambda: joblib.Parallel(n_jobs=WORKERS)(
            joblib.delayed(process_segment)(s) for s in segs),
        "joblib Parallel + Memory cache": cached_run,
    }
    joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(process_segment)(s) for s in segs[:4])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(timed(run))
    return times


def joblib_child(location: str, n: int) -> None:
    import joblib

    cached = joblib.Memory(location, verbose=0).cache(process_segment)
    results = joblib.Parallel(n_jobs=WORKERS, return_as="generator")(
        joblib.delayed(cached)(s) for s in segments(n))
    for done, _ in enumerate(results, 1):
        if done >= KILL_AT * n:
            os.kill(os.getpid(), signal.SIGKILL)


def joblib_resume(segs: list[Segment], scratch: Path) -> dict[str, Any]:
    import joblib

    location = tempfile.mkdtemp(dir=scratch)
    child(["joblib", location, str(len(segs))])
    cached = joblib.Memory(location, verbose=0).cache(process_segment)
    start = time.perf_counter()
    out = joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(cached)(s) for s in segs)
    seconds = time.perf_counter() - start
    assert len(out) == len(segs)
    return {"seconds": seconds}


# ---- the run -------------------------------------------------------------------------------------


def child(args: list[str]) -> None:
    """Run one dying child (``--child``) to its SIGKILL. stagepool's workers notice and exit;
    joblib's loky workers and resource trackers outlive a SIGKILLed parent (holding this run's
    stdout open), so the child runs in its own process group and whatever is left of it goes."""
    with subprocess.Popen([sys.executable, "-m", "benchmarks.resume_bench", "--child", *args],
                          cwd=ROOT, start_new_session=True) as done:
        try:
            done.wait(timeout=600)
        finally:
            try:
                os.killpg(done.pid, signal.SIGKILL)  # the group keeps the leader's pid
            except ProcessLookupError:
                pass
    if done.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the {args[0]} child was to kill itself at 90%, exit {done.returncode}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="60 segments, 1 repeat (smoke run)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default 3)")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--child", nargs=3, metavar=("PEER", "DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        peer, location, n = args.child
        (stagepool_child if peer == "stagepool" else joblib_child)(location, int(n))
        return {}
    n, repeat = (60, 1) if args.quick else (300, args.repeat or 3)
    segs = segments(n)
    with tempfile.TemporaryDirectory(prefix="stagepool-resume-") as tmp, \
            sp.Engine(workers=WORKERS) as engine:
        scratch = Path(tmp)
        engine.map(process_segment, segs[:2 * WORKERS], chunk_size=1)  # warm workers
        cpu: dict[str, list[float]] = {}
        times = stagepool_rows(engine, segs, repeat, scratch, cpu)
        resumed = stagepool_resume(engine, segs, scratch)
        times.update(joblib_rows(segs, repeat, scratch))
        joblib_resumed = joblib_resume(segs, scratch)
    result = summarize(n, repeat, times, cpu, resumed, joblib_resumed)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resume.json").write_text(json.dumps(result, indent=2))
    return result


def paired(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over repeats of (row / base) in the same repeat: the two ran back to back, so a
    change in the machine's load between repeats cancels out."""
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def summarize(n: int, repeat: int, times: dict[str, list[float]], cpu: dict[str, list[float]],
              resumed: dict[str, Any], joblib_resumed: dict[str, Any]) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [{"row": name, "median_s": median[name], "min_s": min(values), "max_s": max(values),
             "vs_plain": paired(times, name, "joblib Parallel" if name.startswith("joblib")
                                else "map"),
             "parent_cpu_s": statistics.median(cpu[name]) if name in cpu else None}
            for name, values in times.items()]
    plain_cpu = statistics.median(cpu["map"])
    extra_cpu = {name: (statistics.median(cpu[name]) - plain_cpu) / median["map"] / WORKERS
                 for name in cpu if name != "map"}
    full, full_joblib = median["map + checkpoint, key="], median["joblib Parallel + Memory cache"]
    return {
        "question": "what does a checkpoint cost, and what does a resume after a kill at 90% save?",
        "segments": n, "repeat": repeat, "workers": WORKERS, "machine": platform.node(),
        "load_average": os.getloadavg(), "rows": rows,
        "resume": {"stagepool": {**resumed, "of_full_run": resumed["seconds"] / full},
                   "joblib.Memory": {**joblib_resumed,
                                     "of_full_run": joblib_resumed["seconds"] / full_joblib}},
        "targets": {
            "journal_cost_key": paired(times, "map + checkpoint, key=", "map") - 1,
            "journal_cost_default_keys": paired(times, "map + checkpoint, default keys", "map") - 1,
            "journal_parent_cpu_key": extra_cpu["map + checkpoint, key="],
            "journal_parent_cpu_default_keys": extra_cpu["map + checkpoint, default keys"],
            "journal_cost_target": TARGET_JOURNAL,
            "resume_of_full": resumed["seconds"] / full, "resume_target": TARGET_RESUME,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['question']}\n{result['segments']} demo segments, {result['workers']} workers, "
          f"median of {result['repeat']}, load {result['load_average'][0]:.1f}")
    print(f"{'row':34} {'median s':>9} {'min-max s':>13} {'vs plain':>9} {'parent cpu s':>12}")
    for row in result["rows"]:
        cpu = "" if row["parent_cpu_s"] is None else f"{row['parent_cpu_s']:12.3f}"
        print(f"{row['row']:34} {row['median_s']:9.2f} {row['min_s']:6.2f}-{row['max_s']:<6.2f} "
              f"{row['vs_plain']:9.3f} {cpu}")
    for peer, r in result["resume"].items():
        extra = f" ({r['restored']} restored, {r['ran']} ran)" if "restored" in r else ""
        print(f"resume after a kill at 90%, {peer:13} {r['seconds']:6.2f} s = "
              f"{r['of_full_run']:.1%} of its full run{extra}")
    t = result["targets"]
    print(f"targets: journaling {t['journal_cost_key']:+.1%} with key= "
          f"({t['journal_cost_default_keys']:+.1%} default keys), at most "
          f"{t['journal_cost_target']:.0%}; resume {t['resume_of_full']:.1%}, at most "
          f"{t['resume_target']:.0%}")
    print(f"journaling's extra parent CPU, as a share of the {WORKERS} cores over the plain run: "
          f"{t['journal_parent_cpu_key']:.2%} with key=, {t['journal_parent_cpu_default_keys']:.2%} "
          "default keys (\"vs plain\" is the median of ratios paired repeat by repeat)")


if __name__ == "__main__":
    main()
