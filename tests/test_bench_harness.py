"""The benchmark harness's own arithmetic and writers: statistics, ratios, rows, table, JSON.

Fast and pool-free: nothing here starts a process. The harness itself is run by
``python -m benchmarks --quick``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

# benchmarks/ is a top-level folder, not an installed package: make the repo root importable
# (plain `pytest` puts only tests/ on sys.path; `python -m pytest` would add the cwd).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cli, report, suite
from benchmarks.harness import RawResult, Summary, ratio, summarize
from benchmarks.peers import PeerSpec

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


def test_missing_baseline_leaves_the_ratio_blank_and_the_verdict_open() -> None:
    (row,) = _tiny_rows({"stagepool": [0.1]})
    assert row["vs_ppe"] is None
    assert row["result"] == "?"


def test_cpu_efficiency_uses_the_serial_total() -> None:
    workload = suite.get("cpu")
    params = {"serial_total_s": 4.0, "workers": 2}
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
    chosen = {s.peer for s in cli.select(specs, ["joblib"], quick=False)}
    assert chosen == {"joblib", "ppe", "stagepool"}
    assert {s.peer for s in cli.select(specs, None, quick=True)} == set(cli.QUICK_PEERS)
    assert cli.select(specs, None, quick=False) == specs


def test_parse_args_defaults_and_bad_names() -> None:
    assert cli.parse_args([]).repeat == 5
    quick = cli.parse_args(["--quick", "--only", "tiny,cpu"])
    assert (quick.repeat, quick.only) == (3, ["tiny", "cpu"])
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
    assert "throughput >= 1.5x best PPE (3.00x)" in stagepool
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
