"""The fault workloads: items that raise (``failures``) and items that kill their worker (``crashes``).

Both run a batch through ``Peer.collect`` (see peers.py), which does it the way a user of each
library would: its one-call map where that is all it offers (most raise at the first failure, and
the row says what came back), or the per-item workaround (one future per item, an iterator that
raises per item) as a separate row. The verdicts are pure functions of what came back
(:func:`failure_tally`, :func:`crash_tally`), unit-tested without pools.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any

from . import workloads
from .base import Target, Workload, check, format_rate
from .peers import Collected, Peer, PeerSpec

__all__ = ["Crashes", "Failures", "crash_tally", "failure_tally"]


def _last_text(runs: list[dict[str, Any]], key: str) -> str:
    return next((r[key] for r in reversed(runs) if r.get(key)), "")


# ---- failures -----------------------------------------------------------------------------------

def failure_tally(got: Collected, n: int, every: int = workloads.FAIL_EVERY) -> dict[str, Any]:
    """Judge a failures batch (item ``i`` returns ``2 i``, every ``every``-th raises ValueError).

    Raises ``RuntimeError`` (the row fails as wrong) for a wrong value, a value or error at the
    wrong index; otherwise counts values and errors, and ``complete`` says whether every item came
    back, each failure as a ValueError at its own index.
    """
    failing = {i for i in range(n) if i % every == every - 1}
    check(all(i not in failing and v == 2 * i for i, v in got.values.items()),
          "a value at a failing index, or not 2 * i")
    check(all(i in failing for i in got.errors), "an error reported for an item that succeeded")
    types = collections.Counter(got.errors.values())
    complete = (len(got.values) == n - len(failing) and set(got.errors) == failing
                and set(types) == {"ValueError"} and got.raised is None and not got.hung)
    return {"values": len(got.values), "errors": len(got.errors), "failing": len(failing),
            "complete": complete, "raised": got.raised or "",
            "error_types": ", ".join(sorted(types))}


class Failures(Workload):
    """Can the pool return all 900 results and the 100 errors in one call, and how fast? 1,000 items,
    every 10th raising.

    Each row is one way to run the batch: a library's one-call map (most raise at the first error;
    the row then says what the caller got back) or its per-item workaround (one future per item, an
    iterator that raises per item). "vs PPE" compares the rows that got everything back against
    ProcessPoolExecutor with one future per item, the stdlib way to collect every error.
    """

    name = "failures"
    baseline = "ppe-submit"

    def params(self, quick: bool) -> dict[str, Any]:
        return {"items": 1_000}  # cheap even for dask (~2 s), so --quick keeps the real size

    def facts(self, params: dict[str, Any]) -> str:
        n = params["items"]
        return (f"{n:,} items (x * 2), every {workloads.FAIL_EVERY}th raises ValueError: "
                f"{n - n // workloads.FAIL_EVERY} values and {n // workloads.FAIL_EVERY} errors to "
                "return; the physical limit is the serial row (the tasks are trivial)")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        n = params["items"]
        return [
            PeerSpec("serial", "serial", "serial loop, try/except per item"),
            PeerSpec("ppe-map", "ppe", "ProcessPoolExecutor.map (one call)", {"how": "map"}),
            PeerSpec("ppe-submit", "ppe", f"ProcessPoolExecutor.submit x {n:,}, per future",
                     {"how": "submit"}),
            PeerSpec("mp-map", "mp", "multiprocessing.Pool.map (one call)", {"how": "map"}),
            PeerSpec("mp-imap", "mp", "multiprocessing.Pool.imap, try/except per next()",
                     {"how": "imap"}),
            PeerSpec("loky", "loky", "loky executor.map (one call)", {"how": "map"}),
            PeerSpec("joblib", "joblib", "joblib Parallel (one call)"),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.map (one call)"),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.map, iterator raising per item",
                     {"how": "map"}),
            PeerSpec("dask", "dask", "dask client.map + status of each future"),
            PeerSpec("stagepool", "stagepool", "stagepool Engine.map -> BatchReport (one call)"),
        ]

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return list(range(params["items"]))

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        began = time.perf_counter()
        got = peer.collect(workloads.fail_every_10th, state)
        seconds = time.perf_counter() - began
        return {"seconds": seconds, "items": len(state), **failure_tally(got, len(state))}

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        extra["complete"] = all(r["complete"] for r in runs)
        extra["values"] = min(r["values"] for r in runs)  # the worst run: a bound, not a typical
        extra["errors"] = min(r["errors"] for r in runs)
        extra["raised"] = _last_text(runs, "raised")
        extra["error_types"] = _last_text(runs, "error_types")
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        if e["complete"]:
            rate = e["items"] / row["median_s"]
            return rate, f"all back: {e['values']} values + {e['errors']} errors, {format_rate(rate)}"
        got = f"{e['values']} values, {e['errors']} errors came back"
        if e["raised"]:
            return 0.0, f"raises {e['raised'].split(':')[0]} at the first error; {got}"
        return 0.0, f"incomplete: {got} ({e['error_types'] or 'no error type'})"

    def ratio_seconds(self, row: dict[str, Any]) -> float | None:
        return row["median_s"] if row["extra"].get("complete") else None

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return (row["extra"]["items"] if row["extra"]["complete"] else 0.0), "items"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def judge(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            e = row["extra"]
            return e["complete"], f"{e['values']} + {e['errors']}"

        n = params["items"]
        every = workloads.FAIL_EVERY
        return [Target(f"{n - n // every} values + {n // every} errors at their indices, one call",
                       judge)]


# ---- crashes ------------------------------------------------------------------------------------

def crash_tally(got: Collected, dying: set[int], n: int) -> dict[str, Any]:
    """Judge a crashes batch (item ``i`` returns ``i`` unless ``i`` is in ``dying``).

    ``innocent_ok``: innocent items that came back right; ``blamed``: dying items reported as
    failed; ``collateral``: innocent items reported as failed (and the commonest error type);
    ``lost``: innocent items with neither a value nor an error (the call raised or hung).
    Raises ``RuntimeError`` for a wrong value or a value for a dying item.
    """
    check(all(i not in dying and v == i for i, v in got.values.items()),
          "a value for a crashing item, or not its index")
    innocent = n - len(dying)
    collateral = {i: t for i, t in got.errors.items() if i not in dying}
    types = collections.Counter(collateral.values()).most_common(1)
    return {"innocent": innocent, "innocent_ok": len(got.values),
            "blamed": sum(1 for i in got.errors if i in dying), "crashes": len(dying),
            "collateral": len(collateral), "collateral_type": types[0][0] if types else "",
            "lost": innocent - len(got.values) - len(collateral),
            "hung": got.hung, "raised": got.raised or ""}


class Crashes(Workload):
    """Does the pool survive workers that die? 2,000 tasks of ~5 ms, 1% kill their worker: innocent
    items completed, and time against the same batch without crashes.

    A dying item calls ``os._exit(1)`` after its busy loop (no exception, no cleanup: like a segfault
    or the OOM killer), at fixed indices (i % 100 == 50). Each run is a pair on the same pool: the
    crash-free batch, then the crashing one; the ratio is taken within the pair. Pools a crash
    breaks get a fresh pool after every crashing batch (its start-up timed apart, not in the
    numbers); a batch that does not answer within max(5 s, 4 x the crash-free time) is "hung".
    """

    name = "crashes"
    CRASH_EVERY = 100
    CRASH_AT = 50

    def params(self, quick: bool) -> dict[str, Any]:
        tasks = 200 if quick else 2_000
        dying = [i for i in range(tasks) if i % self.CRASH_EVERY == self.CRASH_AT]
        return {"tasks": tasks, "task_s": 0.005, "dying": dying}

    def facts(self, params: dict[str, Any]) -> str:
        ideal = params["tasks"] * params["task_s"] / params["workers"]
        return (f"{params['tasks']:,} tasks x {params['task_s'] * 1e3:.0f} ms busy loop, "
                f"{len(params['dying'])} die (os._exit(1) at i % {self.CRASH_EVERY} == "
                f"{self.CRASH_AT}); physical limit (crash-free, {params['workers']} workers) "
                f"{ideal:.2f} s; median s = the crashing batch; vs PPE compares the crash-free "
                "batches (PPE cannot finish a crashing one)")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        fresh = {"fresh": True}
        return [
            PeerSpec("serial", "serial", "serial loop",
                     na="a dying item kills the only process: there is no pool to survive it"),
            PeerSpec("ppe", "ppe", "ProcessPoolExecutor.submit per task", {"how": "submit"},
                     case=fresh),
            PeerSpec("mp", "mp", "multiprocessing.Pool.map", {"how": "map"}, case=fresh),
            PeerSpec("loky", "loky", "loky executor.submit per task", {"how": "submit"},
                     case=fresh),
            PeerSpec("joblib", "joblib", "joblib Parallel", case=fresh),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.map", case=fresh),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.schedule per task",
                     {"how": "schedule"}),
            PeerSpec("dask", "dask", "dask client.map (nanny restarts dead workers)"),
            PeerSpec("stagepool", "stagepool", "stagepool Engine.map"),
        ]

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        # Each run is two batches on a pool the start-up probe has warmed: no warm-up run. Peers
        # that hang or crawl through the crashes (mp.Pool, dask) run once: more says nothing new.
        return (0, 1) if spec.peer in ("mp", "dask") else (0, min(repeat, 3))

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        n, s, dying = params["tasks"], params["task_s"], set(params["dying"])
        return {"clean": [(i, s, False) for i in range(n)],
                "crashing": [(i, s, i in dying) for i in range(n)],
                "dying": dying, "fresh": bool(spec.case.get("fresh"))}

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        began = time.perf_counter()
        clean = peer.collect(workloads.spin_or_die, state["clean"])
        clean_s = time.perf_counter() - began
        check(len(clean.values) == len(state["clean"]) and clean.raised is None,
              f"crash-free batch: {len(clean.values)} values, raised {clean.raised}")
        deadline = max(5.0, 4 * clean_s)
        began = time.perf_counter()
        got = peer.collect(workloads.spin_or_die, state["crashing"], deadline=deadline)
        seconds = time.perf_counter() - began
        restart_s = peer.restart() if state["fresh"] or got.hung else None
        tally = crash_tally(got, state["dying"], len(state["crashing"]))
        return {"seconds": seconds, "nocrash_s": clean_s, "ratio": seconds / clean_s,
                "deadline_s": deadline, "restart_s": restart_s, **tally}

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        extra["ratio"] = statistics.median(r["ratio"] for r in runs)  # paired within each run
        for key in ("innocent_ok", "blamed"):  # the worst run: every run must be complete
            extra[key] = min(r[key] for r in runs)
        for key in ("collateral", "lost"):
            extra[key] = max(r[key] for r in runs)
        extra["hung"] = any(r["hung"] for r in runs)
        extra["raised"] = _last_text(runs, "raised")
        extra["collateral_type"] = _last_text(runs, "collateral_type")
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        ok = f"{e['innocent_ok']:,}/{e['innocent']:,} innocent ok"
        if e["hung"]:
            return e["ratio"], (f"hung: no answer within {e['deadline_s']:.0f} s; {ok}")
        if e["raised"]:
            return e["ratio"], f"raises {e['raised'].split(':')[0]}; {ok}"
        if e["collateral"]:  # every pending item failed with the pool: no blame to speak of
            text = f"{ok}, {e['collateral']:,} innocent failed too ({e['collateral_type']})"
        else:
            text = f"{ok}, {e['blamed']}/{e['crashes']} crashes blamed exactly"
        if e["innocent_ok"] == e["innocent"]:
            text += f"; crash/no-crash {e['ratio']:.2f}x"
        return e["ratio"], text + f" (no-crash {e['nocrash_s']:.2f} s)"

    def ratio_seconds(self, row: dict[str, Any]) -> float | None:
        return row["extra"].get("nocrash_s")  # type: ignore[no-any-return]

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        # A pool that broke early is fast at returning little: only a complete batch gets a bar.
        e = row["extra"]
        return (e["innocent_ok"] if e["innocent_ok"] == e["innocent"] else 0.0), "innocent items"

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def ratio(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            return row["extra"]["ratio"] <= 2.0, f"{row['extra']['ratio']:.2f}x"

        def innocent(row: dict[str, Any],
                     rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            e = row["extra"]
            return e["innocent_ok"] == e["innocent"], f"{e['innocent_ok']}/{e['innocent']}"

        return [Target("crash/no-crash <= 2.0", ratio), Target("every innocent item ok", innocent)]
