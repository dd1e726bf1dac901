"""The core workloads: tiny, cpu, uneven, stream; and the registry of every workload.

Each workload is a small class whose docstring's first line is the question it answers (see
``base.py`` for the parts of a workload). The fault workloads live in ``faults.py``, the data
workloads in ``payloads.py``, the asyncio one in ``aio.py``; ``WORKLOADS`` below lists them all in
the order the harness runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import workloads
from .aio import Async
from .base import (
    MB,
    RssSampler,
    Target,
    Workload,
    check,
    format_rate,
    map_specs,
    timed_map,
    workers_of,
)
from .calls import Submits
from .faults import Crashes, Failures
from .media_real import MediaReal
from .payloads import BigArrays, BigStream, Media
from .peers import Peer, PeerSpec

__all__ = ["WORKLOADS", "Target", "Workload", "balanced_split", "format_rate", "get",
           "heavy_tailed_durations", "ideal_makespan"]


# ---- tiny ---------------------------------------------------------------------------------------

# A timed run of ``tiny`` maps this many times (at most TINY_BURST_SECONDS, at least once) and
# reports the median map.
TINY_BURST = 40
TINY_BURST_SECONDS = 1.0


class Tiny(Workload):
    """What does each pool charge per trivial task? 20,000 x ``x * 2``, microseconds per item.

    Nothing here is worth parallelising: the number is pure overhead (pickling, pipes, scheduling),
    and it decides how small a task can be before a pool makes it slower. Each timed run is the
    median of a burst of maps (up to TINY_BURST, within TINY_BURST_SECONDS). In a full run each
    pool row also keeps a ``multiprocessing.Pool`` in its process and maps on it right before or
    after each of its own maps, in turn: "x mp paired" is the median of those pairs' ratios, both
    pools meeting the same moment of the machine (``_reference``). The timeout row pairs the same
    way with an engine without a timeout: what a timeout costs.
    """

    name = "tiny"
    baseline = "ppe-best"

    def params(self, quick: bool) -> dict[str, Any]:
        # dask.distributed schedules every item as its own task (measured ~1.7 ms each here, so
        # 35 s per run for 20,000): it gets fewer items; its metric is per item all the same.
        return {"items": 20_000, "dask_items": 200 if quick else 2_000, "pair_mp": not quick}

    def facts(self, params: dict[str, Any]) -> str:
        paired = ("; \"x mp paired\": each pool row maps on a multiprocessing.Pool in its own "
                  "process beside each of its maps, the median of the pairs' ratios"
                  if params.get("pair_mp") else "")
        return (f"{params['items']:,} items (dask {params['dask_items']:,}); the physical limit "
                f"is the serial loop's time per item: a pool only adds to it{paired}")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        dask = params["dask_items"]
        return [
            PeerSpec("serial", "serial", "serial loop"),
            PeerSpec("ppe-64", "ppe", "ProcessPoolExecutor.map chunksize=64", {"chunksize": 64}),
            PeerSpec("ppe-512", "ppe", "ProcessPoolExecutor.map chunksize=512", {"chunksize": 512}),
            PeerSpec("mp", "mp", "multiprocessing.Pool.map (default chunks)"),
            PeerSpec("loky", "loky", "loky reusable executor chunksize=512", {"chunksize": 512}),
            PeerSpec("joblib", "joblib", 'joblib Parallel batch_size="auto"'),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.map (default chunks)"),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.map chunksize=512",
                     {"chunksize": 512}),
            PeerSpec("dask", "dask", f"dask.distributed client.map ({dask:,} items)",
                     case={"items": dask}),
            # joblib's dask backend measured ~10x client.map's time per item here: fewer items.
            PeerSpec("joblib-dask", "joblib-dask",
                     f'joblib parallel_config(backend="dask") ({dask // 4:,} items)',
                     case={"items": dask // 4}),
            PeerSpec("stagepool", "stagepool", 'stagepool Engine.map chunk_size="auto"'),
            # The same local engine in a process that imported dask.distributed (~185 more
            # reducers in copyreg.dispatch_table): within noise of the row above, or a pickler
            # is copying that table per message.
            PeerSpec("stagepool-distributed", "stagepool",
                     "stagepool Engine.map, dask.distributed imported",
                     {"import_distributed": True}),
            PeerSpec("stagepool-timeout", "stagepool",
                     'stagepool Engine.map chunk_size="auto", timeout=60', {"timeout": 60}),
            STAGEPOOL_ON_DASK,
        ]

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return list(range(spec.case.get("items", params["items"]))), _reference(params, spec)

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        # One map of 20,000 tiny items takes ~5 ms: a single one per timed run measured the
        # moment (the same row moved 2-3x between runs), so a run is a burst of maps, every
        # peer alike, and its time is the burst's median map.
        items, reference = state
        times: list[float] = []
        pairs: list[tuple[float, float]] = []  # (the reference's map, this peer's), side by side
        began = time.perf_counter()
        while len(times) < TINY_BURST and (
                not times or time.perf_counter() - began < TINY_BURST_SECONDS):
            if reference is None:
                seconds, values = timed_map(peer, workloads.double, items)
            else:  # the reference first, then last, in turn
                seconds, values, beside = _beside(peer, reference[1], items, len(times) % 2 == 0)
                pairs.append((beside, seconds))
            check(len(values) == len(items) and sum(values) == 2 * sum(items), "sum of x * 2")
            times.append(seconds)
        paired = {} if reference is None else {
            f"vs_{reference[0]}": statistics.median(ref / own for ref, own in pairs),
            f"{reference[0]}_s": statistics.median(ref for ref, _ in pairs)}
        return {"seconds": statistics.median(times), "items": len(items), "maps": len(times),
                **paired}

    def release(self, state: Any) -> None:
        _, reference = state
        if reference is not None:
            reference[1].close()

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        per_item = row["median_s"] / row["extra"]["items"]
        text = f"{per_item * 1e6:.2f} us/item ({format_rate(1 / per_item)})"
        for key, name in (("vs_mp", "mp"), ("vs_untimed", "untimed")):
            if key in row["extra"]:
                text += f", {row['extra'][key]:.2f}x {name} paired"
        return per_item * 1e6, text

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return row["extra"]["items"], "items"

    def derive(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ppe = [r for r in rows if r["key"] in ("ppe-64", "ppe-512") and r["status"] == "ok"]
        if not ppe:
            return rows
        best = min(ppe, key=lambda r: r["median_s"])
        derived = {**best, "key": "ppe-best", "derived": True,
                   "label": f"ProcessPoolExecutor best (= {best['key']})"}
        at = max(i for i, r in enumerate(rows) if r["key"] in ("ppe-64", "ppe-512"))
        return [*rows[:at + 1], derived, *rows[at + 1:]]

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def vs_ppe(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            r = row.get("vs_ppe")
            return (None, "no PPE baseline") if r is None else (r >= 2.0, f"{r:.2f}x")

        def vs_mp(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            paired = row["extra"].get("vs_mp")
            if paired is not None:
                return paired >= 1.0, f"{paired:.2f}x mp paired"
            mp = rows.get("mp")
            if not mp or mp["status"] != "ok":
                return None, "no mp.Pool row"
            r = mp["median_s"] / row["median_s"]
            return row["median_s"] <= mp["median_s"], f"{r:.2f}x mp"

        def timeout_cost(row: dict[str, Any],
                         rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            plain = rows.get("stagepool")
            if not plain or plain["status"] != "ok":
                return None, "no stagepool row without a timeout"
            paired = row["extra"].get("vs_untimed")  # an engine without a timeout beside it
            if paired:
                cost = 1 / paired - 1
                return cost <= 0.10, f"{cost:+.0%} vs no timeout (paired)"
            cost = row["median_s"] / plain["median_s"] - 1
            return cost <= 0.10, f"{cost:+.0%} vs no timeout"

        def timed(row: dict[str, Any]) -> bool:
            return row["key"] == "stagepool-timeout"

        return [Target("throughput >= 2x best PPE", vs_ppe, lambda row: not timed(row)),
                Target("no slower than mp.Pool.map", vs_mp, lambda row: not timed(row)),
                Target("a numeric timeout costs <= 10%", timeout_cost, timed)]


# ---- cpu ----------------------------------------------------------------------------------------

def calibrate_numpy_work(target_s: float, samples: int = 9) -> dict[str, Any]:
    """Find the iteration count that makes one numpy_work call take ``target_s`` on one core,
    then measure that call ``samples`` times: the median is the per-task serial duration.

    Scaling uses the fastest of three calls, since noise from other processes only ever adds
    time (one slow sample once made the "20 ms" task 6 ms), and is repeated until within 5%.
    """
    workloads.numpy_work(20)  # import numpy, warm the caches
    iterations = 50
    while _fastest(iterations, 3) < target_s / 4:
        iterations *= 2
    for _ in range(4):
        took = _fastest(iterations, 3)
        iterations = max(1, round(iterations * target_s / took))
        if abs(took - target_s) <= 0.05 * target_s:
            break
    durations = [_fastest(iterations, 1) for _ in range(samples)]
    return {"iterations": iterations, "task_s": statistics.median(durations),
            "calibration_samples_s": durations}


def _fastest(iterations: int, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        began = time.perf_counter()
        workloads.numpy_work(iterations)
        best = min(best, time.perf_counter() - began)
    return best


class _CpuBound(Workload):
    """A CPU workload: every map peer plus the hardware-ceiling row; serial runs once."""

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return map_specs(ceiling_workers=params["workers"])

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        return (0, 1) if spec.peer == "serial" else (1, repeat)

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return params["tasks"], "tasks"

    def derive(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return annotate_ceiling(rows)


# stagepool on a dask LocalCluster, beside client.map and the local engine (tiny and cpu).
STAGEPOOL_ON_DASK = PeerSpec("stagepool-dask", "stagepool-dask",
                             'stagepool Engine(backend="dask").map chunk_size="auto"')


class Cpu(_CpuBound):
    """Do the workers stay busy on uniform CPU work? 200 numpy tasks of ~20 ms, efficiency.

    efficiency = (per-task serial duration x tasks) / (workers x wall time), the serial duration
    measured in the harness before any pool runs; 1.0 means no core ever waited. "of ceiling":
    the same work split in advance over plain processes, timed right before each run of the row
    (the hardware ceiling: what that many processes really achieve on this machine), / the run.
    """

    name = "cpu"

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return [*super().specs(params), STAGEPOOL_ON_DASK]

    def params(self, quick: bool) -> dict[str, Any]:
        tasks = 20 if quick else 200
        calib = calibrate_numpy_work(0.02)
        return {"tasks": tasks, **calib, "serial_total_s": calib["task_s"] * tasks,
                "pair_ceiling": not quick}

    def facts(self, params: dict[str, Any]) -> str:
        limit = params["serial_total_s"] / params["workers"]
        return (f"{params['tasks']} tasks x {params['iterations']} iterations; serial task "
                f"{params['task_s'] * 1e3:.2f} ms (median of {len(params['calibration_samples_s'])})"
                f", serial total {params['serial_total_s']:.2f} s; physical limit (serial / "
                f"{params['workers']} workers) {limit:.2f} s{_pairing_note(params)}")

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        items = [params["iterations"]] * params["tasks"]
        return items, workloads.numpy_work(params["iterations"]), _pairing(params, spec)

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        items, expected, ceiling = state
        paired = _ceiling_run(ceiling, workloads.numpy_work, items)
        seconds, values = timed_map(peer, workloads.numpy_work, items)
        check(len(values) == len(items) and all(v == expected for v in values),
              "numpy_work values")
        return {"seconds": seconds, **_paired(paired, seconds)}

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        workers = workers_of(row, params)
        eff = params["serial_total_s"] / (workers * row["median_s"])
        speedup = params["serial_total_s"] / row["median_s"]
        return eff, f"eff {eff:.3f}, speedup {speedup:.2f}x"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def judge(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            return row["metric"] >= 0.95, f"{row['metric']:.3f}"

        return [Target("efficiency >= 0.95", judge)]


# The rows of tiny that map on a reference pool beside their own maps: the local pools (the
# serial loop is the limit, not a pool; dask's rows map fewer items).
_PAIRED = ("ppe", "loky", "joblib", "mpire", "pebble", "stagepool")


def _beside(peer: Peer, reference: Peer, items: list[int],
            reference_first: bool) -> tuple[float, list[Any], float]:
    """Map ``items`` on ``peer`` and on ``reference`` back to back: (the peer's seconds, its
    values, the reference's seconds)."""
    if reference_first:
        beside, _ = timed_map(reference, workloads.double, items)
    seconds, values = timed_map(peer, workloads.double, items)
    if not reference_first:
        beside, _ = timed_map(reference, workloads.double, items)
    return seconds, values, beside


def _reference(params: dict[str, Any], spec: PeerSpec) -> tuple[str, Peer] | None:
    """What a tiny row maps on beside its own maps (see Tiny), started before the row's own
    pool: ``("untimed", the same engine without its timeout)`` for a row with a timeout, else
    ``("mp", a multiprocessing.Pool)``; None for rows without one and in a --quick run. A
    reference that fails to start is closed before the error goes on."""
    if not params.get("pair_mp") or spec.peer not in _PAIRED \
            or spec.options.get("backend", "local") != "local":
        return None
    from .peers import MpPoolPeer, make_peer

    if "timeout" in spec.options:
        untimed = {k: v for k, v in spec.options.items() if k != "timeout"}
        name, peer = "untimed", make_peer(dataclasses.replace(spec, options=untimed),
                                          params["workers"])
    else:
        name, peer = "mp", MpPoolPeer(params["workers"])
    try:
        peer.start()
    except BaseException:
        with contextlib.suppress(Exception):  # the start's own error is the one to report
            peer.close()
        raise
    return name, peer


def _pairing_note(params: dict[str, Any]) -> str:
    if not params.get("pair_ceiling"):
        return ""
    return ("; \"of ceiling\" is paired run by run with the hardware ceiling and holds on a noisy "
            "machine, \"vs PPE\" compares rows run at different moments")


def _pairing(params: dict[str, Any], spec: PeerSpec) -> Peer | None:
    """A pool row of cpu/uneven times the hardware ceiling right before each of its own runs (the
    pair shares whatever else the machine is doing); the serial and ceiling rows do not, nor does
    any row in a --quick run (it doubles the row's time; the ceiling row stands in)."""
    if spec.peer in ("serial", "ceiling") or not params.get("pair_ceiling"):
        return None
    from .peers import CeilingPeer

    ceiling = CeilingPeer(params["workers"])
    ceiling.start()
    return ceiling


def _ceiling_run(ceiling: Peer | None, fn: Any, items: list[Any]) -> float | None:
    if ceiling is None:
        return None
    ceiling.map(fn, items)
    return ceiling.run_extra()["seconds"]  # type: ignore[no-any-return]


def _paired(ceiling_s: float | None, seconds: float) -> dict[str, float]:
    return {} if ceiling_s is None else {"ceiling_s": ceiling_s, "vs_ceiling": ceiling_s / seconds}


def annotate_ceiling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every pool row ``vs_ceiling``: hardware-ceiling seconds / its seconds, 1.0 = as fast as
    two plain processes with the work split in advance (the most two workers achieve here). The
    median of the ratios paired run by run when the row timed the ceiling itself; else against
    the ceiling row's median. Said in the metric text; nothing changes without a ceiling."""
    ceiling = next((r for r in rows if r["key"] == "ceiling" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok" or row["peer"] in ("serial", "ceiling"):
            continue
        paired = row["extra"].get("vs_ceiling")
        if paired is None and ceiling is None:
            continue
        row["vs_ceiling"] = paired if paired is not None else ceiling["median_s"] / row["median_s"]
        row["metric_text"] += f", {row['vs_ceiling']:.2f} of ceiling"
    return rows


def balanced_split(weights: list[float], parts: int) -> list[list[int]]:
    """Indices of ``weights`` in ``parts`` groups of nearly equal total weight (longest first onto
    the lightest group; each group in input order). The static split a hand-written two-process
    program would use."""
    groups: list[list[int]] = [[] for _ in range(max(1, parts))]
    totals = [0.0] * len(groups)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        lightest = totals.index(min(totals))
        groups[lightest].append(i)
        totals[lightest] += weights[i]
    return [sorted(g) for g in groups]


# ---- uneven -------------------------------------------------------------------------------------

def heavy_tailed_durations(n: int, *, mean_s: float = 0.02, cap_s: float = 0.3,
                           seed: int = 20240611) -> list[float]:
    """``n`` lognormal (sigma 1) durations scaled to ``mean_s``, capped at ``cap_s``; fixed seed."""
    import numpy as np

    raw = np.random.default_rng(seed).lognormal(mean=0.0, sigma=1.0, size=n)
    scaled = np.minimum(raw * (mean_s / raw.mean()), cap_s)
    return [float(d) for d in scaled]


def ideal_makespan(durations: list[float], workers: int) -> float:
    """A lower bound no schedule can beat: the even split, or the longest task if that is longer."""
    return max(sum(durations) / workers, max(durations)) if durations else 0.0


class Uneven(_CpuBound):
    """Does the pool balance heavy-tailed tasks? 200 busy loops (lognormal, mean ~20 ms, cap 300 ms),
    makespan / ideal.

    ideal = max(sum of durations / workers, longest task): a pool that hands out big chunks blind
    leaves one worker with the tail while the other idles. "of ceiling": as in cpu, the durations
    split in advance (balanced) over plain processes, timed right before each run of the row.
    """

    name = "uneven"

    def params(self, quick: bool) -> dict[str, Any]:
        durations = heavy_tailed_durations(40 if quick else 200)
        return {"tasks": len(durations), "durations_s": durations, "sum_s": sum(durations),
                "longest_s": max(durations), "mean_s": sum(durations) / len(durations),
                "pair_ceiling": not quick}

    def facts(self, params: dict[str, Any]) -> str:
        return (f"{params['tasks']} tasks, sum {params['sum_s']:.2f} s, mean "
                f"{params['mean_s'] * 1e3:.1f} ms, longest {params['longest_s'] * 1e3:.0f} ms; "
                f"physical limit (ideal with {params['workers']} workers) "
                f"{ideal_makespan(params['durations_s'], params['workers']):.2f} s"
                f"{_pairing_note(params)}")

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return list(params["durations_s"]), _pairing(params, spec)

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        items, ceiling = state
        paired = _ceiling_run(ceiling, workloads.spin, items)
        seconds, values = timed_map(peer, workloads.spin, items)
        check(values == items, "spin durations echoed back in order")
        return {"seconds": seconds, **_paired(paired, seconds)}

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        ideal = ideal_makespan(params["durations_s"], workers_of(row, params))
        value = row["median_s"] / ideal
        return value, f"makespan/ideal {value:.3f}"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def judge(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            return row["metric"] <= 1.10, f"{row['metric']:.3f}"

        return [Target("makespan/ideal <= 1.10", judge)]


def clips_long_last(short: int, long: int, seed: int = 14) -> list[float]:
    """``short`` clips of 5-25 ms (fixed seed), then ``long`` clips: 0.2-0.5 s, and a last one of
    1 s (the straggler: a 30-second segment among 2-second ones)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    longs = [float(x) for x in np.linspace(0.2, 0.5, long - 1)] + [1.0]
    return [float(x) for x in rng.uniform(0.005, 0.025, short)] + longs


class UnevenCost(Uneven):
    """Does a cost hint keep a batch from ending on its longest items? 195 short clips (5-25 ms)
    then 5 long ones (0.2-0.5 s, and 1 s last), makespan / ideal, with and without ``cost=``.

    ideal = max(sum of durations / workers, longest task). Given in input order, every pool
    starts the long clips last and the batch ends on them; stagepool with ``cost=`` (each item
    is its duration) starts them first (longest-first) and cuts chunks by cost. "of ceiling":
    the durations split in advance (balanced) over plain processes.
    """

    name = "uneven-cost"

    def params(self, quick: bool) -> dict[str, Any]:
        durations = clips_long_last(38, 2) if quick else clips_long_last(195, 5)
        return {"tasks": len(durations), "durations_s": durations, "sum_s": sum(durations),
                "longest_s": max(durations), "mean_s": sum(durations) / len(durations),
                "pair_ceiling": not quick}

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return [*super().specs(params),
                PeerSpec("stagepool-cost", "stagepool", "stagepool Engine.map cost=duration "
                         "(longest first)", options={"cost": "item"})]

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def judge(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            if row["key"] != "stagepool-cost":
                return None, "without the hint: no target (compare)"
            return row["metric"] <= 1.03, f"{row['metric']:.3f}"

        return [Target("with cost=: makespan/ideal <= 1.03", judge)]


# ---- stream -------------------------------------------------------------------------------------

class _Feed:
    """64-byte items, endless until ``stop`` (or ``limit`` of them); counts what was taken."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.taken = 0
        self.stopped = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        i = 0
        while not self.stopped.is_set() and (self.limit is None or i < self.limit):
            self.taken = i + 1  # counted when handed out, not when the generator resumes
            yield (i & 0xFFFFFFFF).to_bytes(8, "little") * 8
            i += 1


class Stream(Workload):
    """Does memory stay flat while streaming an endless input? imap until 1,000,000 outcomes,
    growth of the parent's RSS (peak - baseline, sampled every 0.1 s).

    The input is a generator that never ends by itself. Rows note how far ahead of the consumer the
    pool read it ("ahead"): a lazy pool takes a few chunks, an eager one everything it can.
    """

    name = "stream"
    baseline = "ppe-finite"

    def params(self, quick: bool) -> dict[str, Any]:
        return {"outcomes": 200_000 if quick else 1_000_000, "item_bytes": 64}

    def facts(self, params: dict[str, Any]) -> str:
        return (f"{params['outcomes']:,} outcomes of {params['item_bytes']}-byte items; the "
                "physical limit is the serial map() row (a pool only adds to it)")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        n = params["outcomes"]
        return [
            PeerSpec("serial", "serial", "serial map() over the generator"),
            PeerSpec("ppe-endless", "ppe", "ProcessPoolExecutor.map (endless input)",
                     na="Executor.map submits the whole input before it yields a result: "
                        "on an endless generator it never returns"),
            PeerSpec("ppe-finite", "ppe", f"ProcessPoolExecutor.map, finite {n:,} chunksize=256",
                     {"chunksize": 256}, case={"finite": True}),
            PeerSpec("mp", "mp", "multiprocessing.Pool.imap chunksize=256", {"chunksize": 256}),
            PeerSpec("loky", "loky", "loky executor.map (endless input)",
                     na="its map is Executor.map: it submits the whole input before it yields a "
                        "result, so on an endless generator it never returns"),
            PeerSpec("joblib", "joblib", 'joblib Parallel(return_as="generator") (endless input)'),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.imap chunk_size=256 (endless input)",
                     {"chunksize": 256}),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.map (endless input)",
                     na="ProcessPool.map schedules every chunk of the input before it returns the "
                        "result iterator: on an endless generator it never returns"),
            PeerSpec("dask", "dask", "dask client.map (endless input)",
                     na="client.map turns the whole input into futures before anything runs: on "
                        "an endless generator it never returns"),
            PeerSpec("stagepool", "stagepool", "stagepool Engine.imap ordered (endless input)"),
        ]

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return params["outcomes"], bool(spec.case.get("finite"))

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        n, finite = state
        feed = _Feed(limit=n if finite else None)
        gc.collect()
        sampler = RssSampler(0.1)
        began = time.perf_counter()
        results = peer.imap(workloads.payload_size, iter(feed))
        count = total = 0
        for value in results:
            total += value
            count += 1
            if count >= n:
                break
        seconds = time.perf_counter() - began
        # Let the input end: multiprocessing.Pool's task thread keeps reading an abandoned endless
        # input forever, and every later imap on the same pool would queue behind it.
        feed.stopped.set()
        close = getattr(results, "close", None)
        if close is not None:
            close()
        growth = sampler.stop()
        check(count == n and total == 64 * n, "payload sizes")
        return {"seconds": seconds, "items": count, "rss_growth_mb": growth / MB,
                "ahead": feed.taken - count}

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        # A memory bound is a worst case: the largest growth of any run, the warm-up included
        # (the first run is the one that has to allocate).
        extra["rss_growth_mb"] = max(r["rss_growth_mb"] for r in [*warmup, *runs])
        extra["ahead"] = max(r["ahead"] for r in [*warmup, *runs])
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        extra = row["extra"]
        rate = extra["items"] / row["median_s"]
        return extra["rss_growth_mb"], (f"RSS +{extra['rss_growth_mb']:.1f} MB, "
                                        f"{format_rate(rate)}, ahead {extra['ahead']:,.0f}")

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def judge(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            return row["metric"] < 50, f"+{row['metric']:.1f} MB"

        return [Target("parent RSS growth < 50 MB", judge)]

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return row["extra"]["items"], "items"


WORKLOADS: dict[str, type[Workload]] = {cls.name: cls for cls in (
    Tiny, Submits, Cpu, Uneven, UnevenCost, Stream, Failures, Crashes, BigArrays, BigStream,
    Async, Media, MediaReal)}


def get(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
