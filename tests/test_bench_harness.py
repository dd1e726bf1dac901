"""The benchmark harness's own arithmetic and writers: statistics, ratios, rows, table, JSON.

Fast and pool-free: nothing here starts a process. The harness itself is run by
``python -m benchmarks --quick``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import pytest

# benchmarks/ is a top-level folder, not an installed package: make the repo root importable
# (plain `pytest` puts only tests/ on sys.path; `python -m pytest` would add the cwd).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import aio, cli, faults, payloads, render, report, suite, tiny_ab
from benchmarks.harness import Job, RawResult, Summary, _collect, ratio, summarize
from benchmarks.peers import PEERS, Collected, PeerSpec, drain, gather_futures, one_call

# ---- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([3.0], Summary(3.0, 3.0, 3.0, 1)),
        ([3.0, 1.0, 2.0], Summary(2.0, 1.0, 3.0, 3)),
        ([4.0, 1.0, 2.0, 3.0], Summary(2.5, 1.0, 4.0, 4)),  # even count: mean of the middle two
        ([1.0, 1.0, 9.0], Summary(1.0, 1.0, 9.0, 3)),  # the median ignores one outlier
    ],
)
def test_summarize_gives_median_and_min_max(samples: list[float], expected: Summary) -> None:
    assert summarize(samples) == expected


def test_summarize_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


@pytest.mark.parametrize(
    ("baseline", "value", "expected"),
    [
        (2.0, 1.0, 2.0),  # twice as fast as the baseline
        (1.0, 4.0, 0.25),
        (1.5, 1.5, 1.0),
        (None, 1.0, None),  # the baseline row failed: no made-up ratio
        (1.0, None, None),
        (0.0, 1.0, None),
        (1.0, 0.0, None),
    ],
)
def test_ratio_is_baseline_over_value(baseline: float | None, value: float | None,
                                      expected: float | None) -> None:
    assert ratio(baseline, value) == expected


# ---- rows ----------------------------------------------------------------------------------------


def _raw(*seconds: float, items: int = 100, status: str = "ok") -> RawResult:
    return RawResult(status=status, startup_s=0.5, warmup=[{"seconds": 9.0, "items": items}],
                     runs=[{"seconds": s, "items": items} for s in seconds])


def _tiny_rows(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    workload = suite.get("tiny")
    params = {"items": 100, "dask_items": 100, "workers": 2}
    specs = {s.key: s for s in workload.specs(params)}
    rows = [cli.build_row(workload, specs[key], _raw(*ts), params) for key, ts in times.items()]
    return cli.finish_rows(workload, rows, params)


def test_build_row_uses_only_the_timed_runs() -> None:
    (row,) = _tiny_rows({"serial": [0.3, 0.1, 0.2]})
    assert (row["median_s"], row["min_s"], row["max_s"]) == (0.2, 0.1, 0.3)
    assert row["warmup_s"] == [9.0]  # kept, but not in the statistics
    assert row["metric"] == pytest.approx(0.2 / 100 * 1e6)  # microseconds per item


def test_build_row_of_a_failed_subprocess_has_no_numbers() -> None:
    workload = suite.get("tiny")
    spec = PeerSpec("dask", "dask", "dask")
    raw = RawResult(status="timeout", reason="no answer within 5 s during start-up")
    row = cli.build_row(workload, spec, raw, {"workers": 2})
    assert row["status"] == "timeout" and row["median_s"] is None and row["metric"] is None


def test_build_row_without_timed_runs_is_an_error() -> None:
    workload = suite.get("tiny")
    row = cli.build_row(workload, PeerSpec("mp", "mp", "mp"), RawResult(status="ok"),
                        {"workers": 2})
    assert row["status"] == "error"


def test_tiny_ratios_are_against_the_best_ppe_chunksize() -> None:
    rows = _tiny_rows({"ppe-64": [0.4], "ppe-512": [0.2], "mp": [0.1], "stagepool": [0.05]})
    by_key = {r["key"]: r for r in rows}
    assert by_key["ppe-best"]["median_s"] == 0.2 and by_key["ppe-best"]["derived"]
    assert [r["key"] for r in rows] == ["ppe-64", "ppe-512", "ppe-best", "mp", "stagepool"]
    assert by_key["ppe-64"]["vs_ppe"] == pytest.approx(0.5)
    assert by_key["stagepool"]["vs_ppe"] == pytest.approx(4.0)


def test_stagepool_targets_pass_and_fail() -> None:
    fast = {r["key"]: r for r in _tiny_rows({"ppe-512": [0.3], "mp": [0.2], "stagepool": [0.1]})}
    assert fast["stagepool"]["result"] == "PASS"
    assert [t["pass"] for t in fast["stagepool"]["targets"]] == [True, True]
    slow = {r["key"]: r for r in _tiny_rows({"ppe-512": [0.3], "mp": [0.1], "stagepool": [0.15]})}
    assert [t["pass"] for t in slow["stagepool"]["targets"]] == [True, False]
    assert slow["stagepool"]["result"] == "FAIL"
    assert "targets" not in slow["mp"]  # only stagepool rows are judged


def test_the_timeout_row_is_judged_on_what_a_timeout_costs() -> None:
    rows = {r["key"]: r for r in _tiny_rows({"ppe-512": [0.3], "mp": [0.2], "stagepool": [0.1],
                                              "stagepool-timeout": [0.105]})}
    assert [t["text"] for t in rows["stagepool"]["targets"]] == [
        "throughput >= 2x best PPE", "no slower than mp.Pool.map"]
    (cost,) = rows["stagepool-timeout"]["targets"]
    assert cost["pass"] and cost["detail"] == "+5% vs no timeout"
    slow = {r["key"]: r for r in _tiny_rows({"stagepool": [0.1], "stagepool-timeout": [0.12]})}
    assert slow["stagepool-timeout"]["result"] == "FAIL"


def _paired_row(key: str, seconds: float, ratio: float, reference: str) -> dict[str, Any]:
    workload = suite.get("tiny")
    params = {"items": 100, "dask_items": 100, "workers": 2, "pair_mp": True}
    spec = {s.key: s for s in workload.specs(params)}[key]
    run = {"seconds": seconds, "items": 100, f"vs_{reference}": ratio,
           f"{reference}_s": seconds * ratio}
    return cli.build_row(workload, spec, RawResult(status="ok", startup_s=0.5, runs=[run]), params)


def test_tiny_rows_paired_with_mp_are_judged_on_the_pairs() -> None:
    """A row that mapped on mp.Pool beside each of its maps is judged on those pairs, not on
    the mp row, which ran at another moment (here: unluckily fast); the timeout row on its
    pairs with an engine without a timeout."""
    workload = suite.get("tiny")
    params = {"items": 100, "workers": 2}
    mp = cli.build_row(workload, PeerSpec("mp", "mp", "mp"), _raw(0.01), params)
    for paired, verdict in [(1.05, True), (0.97, False)]:
        rows = {r["key"]: r for r in cli.finish_rows(workload, [
            mp, _paired_row("stagepool", 0.1, paired, "mp"),
            _paired_row("stagepool-timeout", 0.2, paired, "untimed")], params)}
        (_, versus_mp) = rows["stagepool"]["targets"]
        assert versus_mp["pass"] is verdict and versus_mp["detail"] == f"{paired:.2f}x mp paired"
        assert rows["stagepool"]["metric_text"].endswith(f"{paired:.2f}x mp paired")
        (cost,) = rows["stagepool-timeout"]["targets"]  # 2x the plain row's seconds: not judged
        assert cost["pass"] and cost["detail"] == f"{1 / paired - 1:+.0%} vs no timeout (paired)"
    slow = cli.finish_rows(workload, [_paired_row("stagepool", 0.1, 1.0, "mp"),
                                      _paired_row("stagepool-timeout", 0.1, 0.88, "untimed")],
                           params)
    assert [t["pass"] for t in slow[1]["targets"]] == [False]  # +14%


def test_a_tiny_row_maps_on_mp_beside_its_own_maps_and_closes_it() -> None:
    """The real thing, in this process: each timed run pairs this peer's maps with a
    multiprocessing.Pool's, and release() ends that pool's processes."""
    import psutil
    from benchmarks.peers import make_peer

    workload = suite.get("tiny")
    params = {"items": 2_000, "dask_items": 100, "workers": 2, "pair_mp": True}
    specs = {s.key: s for s in workload.specs(params)}
    assert suite._reference(params, specs["serial"]) is None  # the limit, not a pool
    assert suite._reference({**params, "pair_mp": False}, specs["stagepool"]) is None
    state = workload.prepare(params, specs["stagepool"])
    assert state[1][0] == "mp"
    pool_workers = [psutil.Process(p.pid) for p in state[1][1].pool._pool]
    peer = make_peer(specs["stagepool"], 2)
    try:
        peer.start()
        run = workload.run(peer, state)
    finally:
        peer.close()
        workload.release(state)
    assert run["items"] == 2_000 and run["maps"] >= 1
    assert run["vs_mp"] > 0 and run["mp_s"] > 0
    _, alive = psutil.wait_procs(pool_workers, timeout=10)
    assert len(pool_workers) == 2 and not alive
    timed = workload.prepare(params, specs["stagepool-timeout"])
    try:  # its reference: the same engine without the timeout
        assert timed[1][0] == "untimed" and timed[1][1].options == {}
    finally:
        workload.release(timed)


def test_single_calls_are_judged_against_ppe_called_the_same_way() -> None:
    workload = suite.get("submits")
    params = {"calls": 100, "workers": 2}
    specs = {s.key: s for s in workload.specs(params)}
    times = {"ppe": 0.2, "ppe-asyncio": 0.4, "stagepool": 0.1, "stagepool-asyncio": 0.5}
    raw = {k: RawResult(status="ok", startup_s=0.5, warmup=[], runs=[{"seconds": t, "calls": 100}])
           for k, t in times.items()}
    rows = {r["key"]: r for r in cli.finish_rows(workload, [
        cli.build_row(workload, specs[k], raw[k], params) for k in times], params)}
    assert rows["stagepool"]["result"] == "PASS"
    assert rows["stagepool-asyncio"]["targets"][0]["detail"] == "0.80x ppe-asyncio"
    assert rows["stagepool-asyncio"]["result"] == "FAIL"


def test_missing_baseline_leaves_the_ratio_blank_and_the_verdict_open() -> None:
    (row,) = _tiny_rows({"stagepool": [0.1]})
    assert row["vs_ppe"] is None
    assert row["result"] == "?"


def test_cpu_efficiency_uses_the_serial_total() -> None:
    workload = suite.get("cpu")
    params = {"serial_total_s": 4.0, "workers": 2, "tasks": 200}
    spec = PeerSpec("stagepool", "stagepool", "stagepool")
    row = cli.build_row(workload, spec, _raw(2.2, 2.0, 2.1), params)
    assert row["metric"] == pytest.approx(4.0 / (2 * 2.1))
    serial = cli.build_row(workload, PeerSpec("serial", "serial", "serial"), _raw(4.0), params)
    assert serial["metric"] == pytest.approx(1.0)  # the serial row is judged with one worker


def test_ideal_makespan_is_the_even_split_or_the_longest_task() -> None:
    assert suite.ideal_makespan([1.0, 1.0, 1.0, 1.0], 2) == 2.0
    assert suite.ideal_makespan([5.0, 1.0, 1.0], 2) == 5.0
    assert suite.ideal_makespan([], 2) == 0.0


def test_heavy_tailed_durations_are_fixed_capped_and_scaled() -> None:
    a = suite.heavy_tailed_durations(200)
    assert a == suite.heavy_tailed_durations(200)
    assert max(a) <= 0.3 and min(a) > 0
    assert 0.015 < sum(a) / len(a) <= 0.02  # scaled to 20 ms, the cap only lowers it


def test_stream_memory_metric_is_the_worst_run_warmup_included() -> None:
    workload = suite.get("stream")
    warm = [{"seconds": 2.0, "items": 10, "rss_growth_mb": 40.0, "ahead": 5}]
    runs = [{"seconds": g, "items": 10, "rss_growth_mb": g, "ahead": 1} for g in (1.0, 2.0)]
    extra = workload.aggregate(warm, runs)
    assert extra["rss_growth_mb"] == 40.0 and extra["ahead"] == 5 and extra["seconds"] == 1.5


def test_select_always_keeps_stagepool_and_the_ppe_baseline() -> None:
    specs = suite.get("tiny").specs({"dask_items": 1})
    chosen = {s.peer for s in cli.select(specs, ["joblib"])}
    assert chosen == {"joblib", "ppe", "stagepool"}
    assert cli.select(specs, None) == specs  # --quick too: every peer gives a row or a reason


def test_parse_args_defaults_and_bad_names() -> None:
    assert cli.parse_args([]).repeat == 5
    quick = cli.parse_args(["--quick", "--only", "tiny,cpu,big-arrays"])
    assert (quick.repeat, quick.only) == (1, ["tiny", "cpu", "big-arrays"])
    assert cli.parse_args(["--markdown", "B.md"]).markdown == Path("B.md")
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "nope"])


# ---- table and JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.0, "0"), (1.23456, "1.23"), (123.456, "123"), (0.0012345, "0.00123"),
     (0.0000081, "0.000008"), (float("nan"), "-")],
)
def test_format_seconds(value: float | None, text: str) -> None:
    assert report.format_seconds(value) == text


def test_format_rate() -> None:
    assert [suite.format_rate(x) for x in (568, 472_455, 4_905_751, 250_000_000)] == [
        "568/s", "472k/s", "4.9M/s", "250M/s"]


def test_format_table_aligns_columns() -> None:
    text = report.format_table(("a", "bb"), [("xxx", "1"), ("y", "22")])
    assert text.splitlines() == ["a    bb", "---  --", "xxx  1", "y    22"]
    with pytest.raises(ValueError, match="cells"):
        report.format_table(("a", "b"), [("only one",)])


def test_format_workload_shows_targets_and_footnotes() -> None:
    rows = _tiny_rows({"ppe-512": [0.3], "mp": [0.2], "stagepool": [0.1]})
    rows.append({"key": "ppe-endless", "peer": "ppe", "label": "PPE endless", "status": "n/a",
                 "reason": "never returns"})
    rows.append({"key": "dask", "peer": "dask", "label": "dask", "status": "error",
                 "reason": "Traceback (most recent call last):\n  ...\nOSError: boom"})
    text = report.format_workload("tiny", "What?", rows)
    lines = text.splitlines()
    assert lines[0] == "== tiny: What?"
    assert lines[1].split()[:3] == ["peer", "metric", "median"]
    stagepool = next(line for line in lines if line.startswith("stagepool"))
    assert "3.00x" in stagepool and stagepool.rstrip().endswith("PASS")
    assert "throughput >= 2x best PPE (3.00x)" in stagepool
    assert "[1] ppe-endless: never returns" in lines
    assert "[2] dask: OSError: boom" in lines  # an error's footnote is its last line
    header = lines[1]
    assert all(len(line) <= len(header) + 200 for line in lines)


def test_write_json_round_trips_and_nulls_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    data = {"machine": {"cpus": 2}, "rows": [{"median_s": 0.5, "vs_ppe": math.nan,
                                              "spread": (1.0, math.inf)}]}
    report.write_json(path, data)
    back = json.loads(path.read_text())
    assert back == {"machine": {"cpus": 2},
                    "rows": [{"median_s": 0.5, "vs_ppe": None, "spread": [1.0, None]}]}
    report.write_json(path, {"again": True})  # replaces the file, leaves no temporary behind
    assert json.loads(path.read_text()) == {"again": True}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_rows_from_the_harness_are_json_ready(tmp_path: Path) -> None:
    rows = _tiny_rows({"ppe-64": [0.4], "ppe-512": [0.2], "mp": [0.1], "stagepool": [0.05]})
    report.write_json(tmp_path / "r.json", {"rows": rows})
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 5


# ---- the workloads' shape ---------------------------------------------------------------------

_SPEC_PARAMS = {"workers": 2, "dask_items": 10, "items": 100, "outcomes": 10, "idle_s": 1.0,
                "tasks": 4}


@pytest.mark.parametrize("name", list(suite.WORKLOADS))
def test_every_workload_asks_a_question_and_names_known_peers(name: str) -> None:
    workload = suite.get(name)
    assert workload.question().endswith((".", "?")) or "?" in workload.question()
    specs = workload.specs(_SPEC_PARAMS)
    assert len({s.key for s in specs}) == len(specs)  # keys are unique within a workload
    assert {s.peer for s in specs} <= set(PEERS)
    assert "stagepool" in {s.peer for s in specs}
    assert workload.baseline in {s.key for s in specs} | {"ppe-best"}  # tiny's is derived
    assert all(s.na is None or len(s.na) > 20 for s in specs)  # an n/a row says why


def test_question_is_the_whole_first_paragraph() -> None:
    question = suite.get("crashes").question()
    assert question.startswith("Does the pool survive workers that die?")
    assert question.endswith("without crashes.") and "\n" not in question


# ---- hardware ceiling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "parts", "expected"),
    [
        ([1.0] * 4, 2, [[0, 2], [1, 3]]),  # equal work: an even split
        ([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2, [[0], [1, 2, 3, 4, 5]]),  # the long task alone
        ([3.0, 3.0, 2.0, 2.0, 2.0], 2, [[0, 2, 4], [1, 3]]),  # greedy (7 / 5), not optimal
        ([], 2, [[], []]),
        ([1.0], 3, [[0], [], []]),
    ],
)
def test_balanced_split(weights: list[float], parts: int, expected: list[list[int]]) -> None:
    groups = suite.balanced_split(weights, parts)
    assert groups == expected
    assert sorted(i for g in groups for i in g) == list(range(len(weights)))


def _ok(key: str, peer: str, median: float, **extra: float) -> dict[str, Any]:
    return {"key": key, "peer": peer, "status": "ok", "median_s": median, "min_s": median,
            "max_s": median, "metric_text": "eff 0.5", "extra": dict(extra)}


def test_ceiling_is_paired_when_the_row_timed_it_and_the_ceiling_row_otherwise() -> None:
    rows = [_ok("serial", "serial", 4.0), _ok("ceiling", "ceiling", 2.0),
            _ok("ppe", "ppe", 2.5), _ok("stagepool", "stagepool", 4.0, vs_ceiling=0.97)]
    by_key = {r["key"]: r for r in suite.annotate_ceiling(rows)}
    assert by_key["ppe"]["vs_ceiling"] == pytest.approx(0.8)  # unpaired: the ceiling row
    assert by_key["stagepool"]["vs_ceiling"] == 0.97  # paired run by run wins
    assert by_key["stagepool"]["metric_text"] == "eff 0.5, 0.97 of ceiling"
    assert "vs_ceiling" not in by_key["serial"] and "vs_ceiling" not in by_key["ceiling"]


def test_without_a_ceiling_rows_are_unchanged() -> None:
    rows = [_ok("ppe", "ppe", 2.5)]
    assert suite.annotate_ceiling(rows)[0]["metric_text"] == "eff 0.5"


# ---- collecting a batch with failures -----------------------------------------------------------


def _items_then(values: list[Any], error: BaseException | None = None) -> Any:
    yield from values
    if error is not None:
        raise error


def test_drain_stops_at_the_first_error_like_executor_map() -> None:
    got = drain(_items_then([0, 2], ValueError("item 2\nmore")), continues=False)
    assert got == Collected(values={0: 0, 1: 2}, raised="ValueError: item 2")


def test_drain_goes_on_when_the_iterator_raises_per_item() -> None:
    class PerItem:
        def __init__(self) -> None:
            self.i = 0

        def __next__(self) -> int:
            self.i += 1
            if self.i > 4:
                raise StopIteration
            if self.i == 2:
                raise KeyError("x")
            return self.i

    assert drain(PerItem(), continues=True) == Collected(values={0: 1, 2: 3, 3: 4},
                                                         errors={1: "KeyError"})


def test_gather_futures_sorts_values_errors_and_pending() -> None:
    done, failed, pending = (concurrent.futures.Future[int]() for _ in range(3))
    done.set_result(7)
    failed.set_exception(OSError("boom"))
    got = gather_futures([done, failed, pending], deadline=0.01)
    assert got == Collected(values={0: 7}, errors={1: "OSError"}, hung=True)
    assert pending.cancelled()


def test_one_call_returns_everything_or_what_it_raised() -> None:
    assert one_call(lambda: [1, 2]) == Collected(values={0: 1, 1: 2})

    def boom() -> list[int]:
        raise RuntimeError("Worker-1 died unexpectedly")

    assert one_call(boom) == Collected(raised="RuntimeError: Worker-1 died unexpectedly")


# ---- failures -----------------------------------------------------------------------------------


def _fail_batch(n: int, *, every: int = 10) -> Collected:
    got = Collected()
    for i in range(n):
        if i % every == every - 1:
            got.errors[i] = "ValueError"
        else:
            got.values[i] = 2 * i
    return got


def test_failure_tally_of_a_complete_batch() -> None:
    tally = faults.failure_tally(_fail_batch(1000), 1000)
    assert (tally["values"], tally["errors"], tally["complete"]) == (900, 100, True)


def test_failure_tally_of_a_map_that_raised() -> None:
    got = Collected(values={i: 2 * i for i in range(9)}, raised="ValueError: item 9")
    tally = faults.failure_tally(got, 1000)
    assert (tally["values"], tally["errors"], tally["complete"]) == (9, 0, False)
    assert tally["raised"] == "ValueError: item 9"


def test_failure_tally_wants_the_error_type_too() -> None:
    got = _fail_batch(100)
    got.errors[9] = "RemoteError"
    tally = faults.failure_tally(got, 100)
    assert not tally["complete"] and tally["error_types"] == "RemoteError, ValueError"


@pytest.mark.parametrize("corrupt", ["value at a failing index", "wrong value", "error for an ok item"])
def test_failure_tally_fails_the_row_on_wrong_answers(corrupt: str) -> None:
    got = _fail_batch(100)
    if corrupt == "value at a failing index":
        got.values[9] = 18
    elif corrupt == "wrong value":
        got.values[0] = 1
    else:
        got.errors[0] = "ValueError"
    with pytest.raises(RuntimeError, match="wrong results"):
        faults.failure_tally(got, 100)


def _failure_rows(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    workload = suite.get("failures")
    params = {"items": 1000, "workers": 2}
    specs = {s.key: s for s in workload.specs(params)}
    rows = []
    for key, run in runs.items():
        raw = RawResult(status="ok", runs=[{"items": 1000, **run}])
        rows.append(cli.build_row(workload, specs[key], raw, params))
    return {r["key"]: r for r in cli.finish_rows(workload, rows, params)}


def test_failures_compare_only_rows_that_got_everything_back() -> None:
    complete = {**faults.failure_tally(_fail_batch(1000), 1000)}
    raised = faults.failure_tally(Collected(raised="ValueError: item 9"), 1000)
    rows = _failure_rows({"ppe-submit": {"seconds": 0.2, **complete},
                          "ppe-map": {"seconds": 0.01, **raised},
                          "stagepool": {"seconds": 0.05, **complete}})
    assert rows["ppe-map"]["vs_ppe"] is None  # fast because it gave up: no ratio
    assert rows["ppe-map"]["metric_text"].startswith("raises ValueError at the first error")
    assert rows["ppe-map"]["throughput"]["per_s"] == 0
    assert rows["stagepool"]["vs_ppe"] == pytest.approx(4.0)
    assert rows["stagepool"]["result"] == "PASS"


def test_failures_target_fails_a_stagepool_that_loses_errors() -> None:
    got = _fail_batch(1000)
    del got.errors[9]
    rows = _failure_rows({"stagepool": {"seconds": 0.05,
                                        **faults.failure_tally(got, 1000)}})
    assert rows["stagepool"]["result"] == "FAIL"


# ---- crashes ------------------------------------------------------------------------------------


def test_crash_tally_of_a_pool_that_survives() -> None:
    dying = {50, 150}
    got = Collected(values={i: i for i in range(200) if i not in dying},
                    errors={50: "WorkerCrashed", 150: "WorkerCrashed"})
    tally = faults.crash_tally(got, dying, 200)
    assert (tally["innocent_ok"], tally["blamed"], tally["collateral"], tally["lost"]) == (
        198, 2, 0, 0)


def test_crash_tally_of_a_pool_that_breaks() -> None:
    got = Collected(values={i: i for i in range(50)},
                    errors={i: "BrokenProcessPool" for i in range(50, 200)})
    tally = faults.crash_tally(got, {50, 150}, 200)
    assert (tally["innocent_ok"], tally["collateral"], tally["collateral_type"]) == (
        50, 148, "BrokenProcessPool")
    hung = faults.crash_tally(Collected(hung=True), {50}, 100)
    assert hung["lost"] == 99 and hung["hung"]
    with pytest.raises(RuntimeError, match="wrong results"):
        faults.crash_tally(Collected(values={50: 50}), {50}, 100)


def _crash_run(seconds: float, nocrash: float, got: Collected) -> dict[str, Any]:
    return {"seconds": seconds, "nocrash_s": nocrash, "ratio": seconds / nocrash,
            "deadline_s": 10.0, "restart_s": None, **faults.crash_tally(got, {5}, 10)}


def _crash_rows(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    workload = suite.get("crashes")
    params = {"tasks": 10, "task_s": 0.005, "dying": [5], "workers": 2}
    specs = {s.key: s for s in workload.specs(params)}
    rows = [cli.build_row(workload, specs[k], RawResult(status="ok", runs=r), params)
            for k, r in runs.items()]
    return {r["key"]: r for r in cli.finish_rows(workload, rows, params)}


def test_crashes_ratio_is_paired_and_vs_ppe_uses_the_crash_free_batch() -> None:
    survived = Collected(values={i: i for i in range(10) if i != 5}, errors={5: "WorkerCrashed"})
    broken = Collected(values={i: i for i in range(5)},
                       errors={i: "BrokenProcessPool" for i in range(5, 10)})
    rows = _crash_rows({
        "ppe": [_crash_run(0.1, 1.0, broken)],
        "stagepool": [_crash_run(1.2, 1.0, survived), _crash_run(3.0, 2.0, survived),
                      _crash_run(5.0, 1.0, survived)],
    })
    sp = rows["stagepool"]
    assert sp["extra"]["ratio"] == pytest.approx(1.5)  # median of 1.2, 1.5, 5.0: paired per run
    assert sp["vs_ppe"] == pytest.approx(1.0)  # crash-free medians: 1.0 vs 1.0
    assert sp["result"] == "PASS" and "crash/no-crash 1.50x" in sp["metric_text"]
    assert "4 innocent failed too (BrokenProcessPool)" in rows["ppe"]["metric_text"]
    assert "crash/no-crash" not in rows["ppe"]["metric_text"]  # incomplete: no ratio shown
    assert rows["ppe"]["throughput"]["per_s"] == 0  # quick to give up is not a throughput
    assert rows["stagepool"]["throughput"]["per_s"] == pytest.approx(9 / 3.0)


def test_crashes_target_wants_every_innocent_item_in_every_run() -> None:
    survived = Collected(values={i: i for i in range(10) if i != 5}, errors={5: "WorkerCrashed"})
    lost_one = Collected(values={i: i for i in range(9) if i != 5}, errors={5: "WorkerCrashed"})
    rows = _crash_rows({"stagepool": [_crash_run(1.0, 1.0, survived),
                                      _crash_run(1.0, 1.0, lost_one)]})
    verdicts = [t["pass"] for t in rows["stagepool"]["targets"]]
    assert verdicts == [True, False] and rows["stagepool"]["result"] == "FAIL"


# ---- big arrays ---------------------------------------------------------------------------------


def _array_rows(runs: dict[str, tuple[float, float, int]]) -> dict[str, dict[str, Any]]:
    workload = suite.get("big-arrays")
    nbytes = 8 << 20
    params = {"tasks": 64, "array_bytes": nbytes, "memcpy_mb_s": 10_000.0, "workers": 2}
    specs = {s.key: s for s in workload.specs(params)}
    rows = []
    for key, (seconds, growth, ahead) in runs.items():
        run = {"seconds": seconds, "items": 64, "payload_mb": 2 * 64 * nbytes / 1e6,
               "rss_growth_mb": growth, "ahead": ahead, "array_bytes": nbytes}
        rows.append(cli.build_row(workload, specs[key], RawResult(status="ok", runs=[run]), params))
    return {r["key"]: r for r in cli.finish_rows(workload, rows, params)}


def test_window_is_the_items_in_flight_in_and_out_plus_the_one_in_hand() -> None:
    assert payloads.window_arrays(4, 1) == 9
    # a lazy input: also the segment the generator has just made
    assert payloads.window_arrays(4, suite.get("big-stream").WINDOW_EXTRA) == 10


def test_big_stream_judges_memory_only() -> None:
    workload = suite.get("big-stream")
    nbytes = 8 << 20
    params = {"tasks": 256, "array_bytes": nbytes, "memcpy_mb_s": 10_000.0, "workers": 2}
    [target] = workload.targets(params)
    row = {"extra": {"ahead": 4, "array_bytes": nbytes, "rss_growth_mb": 84.0}}
    assert target.check(row, {}) == (True, "+84 MB of 2,147 MB in; window 10 arrays = 84 MB")
    row["extra"]["rss_growth_mb"] = 108.0  # 5% of the 2,147 MB streamed is 107 MB
    assert target.check(row, {})[0] is False


def test_big_arrays_targets() -> None:
    rows = _array_rows({"ppe": (3.0, 50.0, 15), "joblib": (1.5, 100.0, 11),
                        "stagepool": (0.9, 70.0, 4), "stagepool-pickle": (2.0, 70.0, 4)})
    sp = rows["stagepool"]
    assert [t["pass"] for t in sp["targets"]] == [True, True, True]
    assert sp["metric"] == pytest.approx(2 * 64 * (8 << 20) / 1e6 / 0.9)  # MB/s, in + out
    assert "targets" not in rows["stagepool-pickle"]  # the pickle path is a reference row
    slow = _array_rows({"ppe": (3.0, 50.0, 15), "joblib": (1.0, 100.0, 11),
                        "stagepool": (1.2, 80.0, 4)})["stagepool"]
    assert [t["pass"] for t in slow["targets"]] == [False, False, False]


def test_big_arrays_memory_is_the_worst_run_warmup_included() -> None:
    extra = suite.get("big-arrays").aggregate(
        [{"seconds": 1.0, "rss_growth_mb": 300.0, "ahead": 40}],
        [{"seconds": 1.0, "rss_growth_mb": 100.0, "ahead": 8}])
    assert (extra["rss_growth_mb"], extra["ahead"]) == (300.0, 40)


# ---- async --------------------------------------------------------------------------------------


def test_representative_run_is_the_median_p99() -> None:
    runs = [{"p99_ms": p, "lags_ms": [p]} for p in (9.0, 1.0, 3.0, 4.0)]
    assert aio.representative_run(runs)["p99_ms"] == 3.0


def test_cdf_points_thin_a_distribution_keeping_its_ends() -> None:
    assert aio.cdf_points([3.0, 1.0, 2.0]) == [1.0, 2.0, 3.0]
    thinned = aio.cdf_points([float(i) for i in range(10_001)], n=101)
    assert len(thinned) == 101 and thinned[0] == 0.0 and thinned[-1] == 10_000.0
    assert thinned[50] == 5_000.0


def _async_row(final: dict[str, Any] | None, *, quick: bool, p99: float = 2.0) -> dict[str, Any]:
    workload = suite.get("async")
    params = {"items": 20_000, "big": 10_000, "small": 100, "idle_s": 2.0, "quick": quick,
              "workers": 2}
    spec = next(s for s in workload.specs(params) if s.key == "stagepool")
    run = {"seconds": 1.0, "items": 20_000, "p50_ms": 0.1, "p99_ms": p99, "max_ms": 3.0,
           "samples": 900, "lags_ms": [0.1, p99]}
    raw = RawResult(status="ok", runs=[run], final=final)
    (row,) = cli.finish_rows(workload, [cli.build_row(workload, spec, raw, params)], params)
    return row


def test_async_targets() -> None:
    final = {"throughput": {"map_async_vs_map": 0.95},
             "fairness": {"small_vs_big": 0.04}}
    row = _async_row(final, quick=False)
    assert row["result"] == "PASS"
    assert row["metric_text"].endswith("map_async 95% of map; small/big 4.0%")
    assert [t["pass"] for t in _async_row(final, quick=False, p99=6.0)["targets"]] == [
        False, True, True]
    quick = _async_row(final, quick=True)  # the fairness target needs the full-size request
    assert [t["pass"] for t in quick["targets"]] == [True, True, None] and quick["result"] == "?"
    assert _async_row(None, quick=False)["result"] == "?"


# ---- harness protocol ---------------------------------------------------------------------------


def test_the_final_measurement_reaches_the_raw_result() -> None:
    receiver, sender = multiprocessing.Pipe(duplex=False)
    for message in [("started", 0.5, {"options": {}}), ("run", True, {"seconds": 2.0}),
                    ("run", False, {"seconds": 1.0}), ("final", {"fairness": 0.05}),
                    ("done", 0.1, [])]:
        sender.send(message)
    job = Job("async", {}, {}, 2, repeat=1, warmup=1, run_timeout=5, start_timeout=5)
    result = RawResult(status="error")
    _collect(receiver, None, job, result)
    assert result.status == "ok" and result.final == {"fairness": 0.05}
    assert (result.warmup, result.runs) == ([{"seconds": 2.0}], [{"seconds": 1.0}])


# ---- throughput, plots, markdown ------------------------------------------------------------


def test_throughput_at_the_median_and_the_extremes() -> None:
    (row,) = _tiny_rows({"stagepool": [0.1, 0.2, 0.4]})
    assert row["throughput"] == {"unit": "items", "per_s": pytest.approx(500.0),
                                 "low": pytest.approx(250.0), "high": pytest.approx(1000.0)}


def test_plot_bars_label_the_gaps() -> None:
    rows = _tiny_rows({"ppe-64": [0.4], "ppe-512": [0.2], "stagepool": [0.1]})
    rows.append({"key": "dask", "peer": "dask", "label": "dask", "status": "timeout"})
    rows.append({"key": "idle", "peer": "serial", "label": "idle", "status": "ok",
                 "throughput": None, "metric_text": "lag"})
    unit, bars = report.plot_bars(rows)
    assert unit == "items"
    assert [b["label"] for b in bars] == [
        "ProcessPoolExecutor.map chunksize=64", "ProcessPoolExecutor.map chunksize=512",
        'stagepool Engine.map chunk_size="auto"', "dask"]  # no derived row, no idle reference
    assert bars[2]["stagepool"] and bars[2]["value"] == pytest.approx(1000.0)
    assert bars[3] == {"label": "dask", "value": 0.0, "low": 0.0, "high": 0.0,
                       "stagepool": False, "note": "timeout"}


def test_markdown_table_escapes_pipes() -> None:
    assert render.markdown_table(("a", "b"), [["x|y", ""]]).splitlines() == [
        "| a | b |", "| --- | --- |", "| x\\|y |  |"]


def _results() -> dict[str, Any]:
    rows = _tiny_rows({"ppe-64": [0.4], "ppe-512": [0.2], "mp": [0.1], "stagepool": [0.05]})
    return {
        "machine": {"cpus": 2, "affinity": 2, "memory_total_bytes": 2**33, "platform": "Linux",
                    "python": "3.11.7", "implementation": "CPython",
                    "mp_default_start_method": "fork", "loadavg_start": [1.0, 1.0, 1.0],
                    "loadavg_end": [2.0, 1.0, 1.0], "stagepool_plan": "2 workers",
                    "versions": {"numpy": "2.0", "stagepool": "0.1.0", "joblib": "1.6"}},
        "settings": {"command": "python -m benchmarks --out benchmarks/results"},
        "method": "medians", "elapsed_s": 600.0, "date": "2026-01-01 10:00 UTC",
        "plots": ["throughput-tiny.png"],
        "workloads": {"tiny": {"question": "What?", "facts": "20,000 items", "rows": rows}},
    }


def test_render_markdown_holds_the_command_the_table_and_the_plots() -> None:
    text = render.render_markdown(_results(), "benchmarks/results")
    assert "`python -m benchmarks --out benchmarks/results` on 2026-01-01 10:00 UTC" in text
    assert "`python -m benchmarks.render benchmarks/results/results.json > BENCHMARKS.md`" in text
    assert "## tiny" in text and "**What?**" in text
    assert "| peer | metric | median s |" in text
    assert "![throughput-tiny.png](benchmarks/results/throughput-tiny.png)" in text
    assert "joblib 1.6" in text and "1.00 at the start, 2.00 at the end" in text
    stagepool = next(line for line in text.splitlines() if line.startswith("| stagepool"))
    assert stagepool.endswith("| PASS |")


def test_summary_has_one_line_per_workload_from_the_judged_stagepool_row() -> None:
    (line,) = render.summary_rows(_results())
    assert line[0] == "tiny" and line[2] == "4.00x" and line[4] == "PASS"
    assert line[3].startswith("throughput >= 2x best PPE (4.00x)")


def test_write_markdown_links_the_plots_relative_to_the_page(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    render.write_markdown(page, _results(), tmp_path / "benchmarks" / "results")
    assert "](benchmarks/results/throughput-tiny.png)" in page.read_text()


def test_render_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    assert render.main([str(tmp_path / "results.json"), "--images", "img"]) == 0
    assert "](img/throughput-tiny.png)" in capsys.readouterr().out


def test_command_line_quotes_what_needs_it() -> None:
    assert cli.command_line(["--out", "my results"]) == "python -m benchmarks --out 'my results'"


def test_backend_dask_moves_only_stagepools_rows() -> None:
    specs = [PeerSpec("ppe", "ppe", "PPE"), PeerSpec("stagepool", "stagepool", "sp", {"x": 1})]
    assert cli.on_backend(specs, "local", None) == specs
    moved = cli.on_backend(specs, "dask", "tcp://h:1")
    assert moved[0] == specs[0]
    assert moved[1].options == {"x": 1, "backend": "dask", "address": "tcp://h:1"}
    assert "dask at tcp://h:1" in moved[1].label
    with pytest.raises(SystemExit):
        cli.parse_args(["--address", "tcp://h:1"])


def test_tiny_ab_ratios_are_paired_by_round() -> None:
    """A load that doubles every pool's time in one round cancels out of the ratios."""
    times = {"mp": [0.010, 0.020], "ppe-512": [0.030, 0.060],
             "stagepool": [0.008, 0.016], "stagepool-timeout": [0.0084, 0.0168]}
    ratios = tiny_ab.summarize(times, 20_000)["ratios"]
    assert ratios["stagepool_vs_mp"] == pytest.approx(1.25)
    assert ratios["stagepool_vs_ppe512"] == pytest.approx(3.75)
    assert ratios["timeout_cost"] == pytest.approx(0.05)


@pytest.mark.parametrize(("shares", "calm", "tries", "kept"), [
    ([0.5, 0.3, 0.1], 0.15, 3, 0.1),  # calm on the third attempt
    ([0.5, 0.4, 0.45, 0.0], 0.15, 3, 0.4),  # never calm: the least disturbed of 1 + 2
    ([0.05], 0.15, 1, 0.05),
    ([0.9], None, 1, 0.9),  # --quick: measured once
])
def test_a_disturbed_row_is_measured_again_and_the_calmest_kept(
        monkeypatch: pytest.MonkeyPatch, shares: list[float], calm: float | None, tries: int,
        kept: float) -> None:
    """The retry policy alone: the row runner and the CPU meter are its inputs here."""
    from benchmarks.harness import RawResult

    readings = iter(shares)
    runs: list[RawResult] = []

    class Meter:
        def __init__(self) -> None:
            self.share = next(readings)

        def foreign_share(self) -> float:
            return self.share

    def run(job: object) -> RawResult:
        runs.append(RawResult(status="ok"))
        return runs[-1]

    monkeypatch.setattr(cli, "CpuMeter", Meter)
    monkeypatch.setattr(cli, "run_isolated", run)
    raw, foreign, made = cli._calm_run(object(), calm)  # type: ignore[arg-type]
    assert (made, foreign) == (tries, kept) and len(runs) == tries
    assert raw is runs[shares.index(kept)]
