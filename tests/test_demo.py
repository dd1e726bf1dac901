"""The main job end to end: ``stagepool demo`` on real workers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import stagepool as sp
from conftest import WAIT
from stagepool import demo


def test_run_demo_reports_exactly_the_corrupt_segments() -> None:
    lines: list[str] = []
    code = demo.run_demo(seconds=16.0, workers=2, progress=False, sample=2, out=lines.append)
    corrupt = sorted(demo.default_corrupt(8))
    assert code == 0, "\n".join(lines)
    assert lines[0].startswith("plan: ") and "workers" in lines[0]
    text = "\n".join(lines)
    assert f"8 items: {8 - len(corrupt)} ok, {len(corrupt)} failed" in text
    for index in corrupt:
        assert f"item {index} [error]: CorruptSegmentError: segment {index} " in text
    assert any(line.startswith("throughput: ") for line in lines)
    assert any(line.startswith("realtime factor: ") for line in lines)
    assert lines[-1].startswith("speedup over serial: ")


def test_run_demo_on_a_dask_cluster() -> None:
    pytest.importorskip("distributed")
    lines: list[str] = []
    code = demo.run_demo(seconds=16.0, workers=2, progress=False, sample=0, out=lines.append,
                         backend="dask")
    assert code == 0, "\n".join(lines)
    assert lines[0].startswith("plan: 2 workers: limited by cluster, in-process LocalCluster")
    bad = subprocess.run([sys.executable, "-m", "stagepool", "demo", "--address", "tcp://x:1"],
                         capture_output=True, text=True, timeout=WAIT)
    assert bad.returncode != 0 and "add --backend dask" in bad.stderr


def test_an_unexpected_failure_makes_the_demo_fail(engine: sp.Engine) -> None:
    segments = list(demo.soundtrack(seconds=8.0))
    report = engine.map(demo.process_segment, [*segments, "not a segment"])
    corrupt = demo.default_corrupt(len(segments))
    assert demo._only_expected_failures(report.failed[:-1], corrupt)
    assert not demo._only_expected_failures(report.failed, corrupt)


def test_demo_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stagepool", "demo", "--seconds", "10", "--no-progress",
         "--workers", "2"],
        capture_output=True, text=True, timeout=WAIT * 4,
    )
    assert result.returncode == 0, result.stderr
    assert "speedup over serial" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "stagepool", "demo", "--workers", "lots"],
                         capture_output=True, text=True, timeout=WAIT)
    assert bad.returncode != 0 and "--workers" in bad.stderr


def test_plan_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "stagepool", "plan", "--mem-per-task", "1GiB"],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert "plan: " in result.stdout and "usable" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "stagepool", "plan", "--mem-per-task", "lots"],
                         capture_output=True, text=True, timeout=WAIT)
    assert bad.returncode == 2 and "mem_per_task" in bad.stderr


def test_run_demo_as_a_pipeline_fails_the_corrupt_segments_in_decode() -> None:
    lines: list[str] = []
    code = demo.run_demo(seconds=16.0, workers=2, progress=False, sample=0, out=lines.append,
                         pipeline=True)
    assert code == 0, "\n".join(lines)
    text = "\n".join(lines)
    for index in sorted(demo.default_corrupt(8)):
        assert f"segment {index} failed in 'decode' [error]: CorruptSegmentError" in text
    assert "  gate: " in text and "  levels: " in text  # one line per stage


def test_the_pipeline_demo_measures_what_process_segment_does() -> None:
    from stagepool._demo_pipeline import demo_pipeline

    segments = [demo.synth_segment(i, segment_seconds=1.0) for i in (0, 1)]
    with sp.Engine(backend="serial") as engine:
        report = engine.run(demo_pipeline(), segments)
    for seg, value in zip(segments, report.values, strict=True):
        expected = demo.process_segment(seg)
        assert value.index == expected.index and value.samples_out == expected.samples_out
        assert abs(value.loudness_dbfs - expected.loudness_dbfs) < 1e-9
        assert abs(value.speech_ratio - expected.speech_ratio) < 1e-9


@pytest.mark.parametrize("argument", ["--seconds", "--segment-seconds"])
def test_an_endless_duration_is_refused_by_name(argument: str) -> None:
    """``--seconds inf`` ended in an OverflowError traceback from the segment count."""
    bad = subprocess.run([sys.executable, "-m", "stagepool", "demo", argument, "inf"],
                         capture_output=True, text=True, timeout=WAIT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "finite" in bad.stderr and "seconds" in bad.stderr


def test_a_segment_longer_than_the_track_is_the_whole_track() -> None:
    """``--segment-seconds 1e300 --seconds 4``: the warm-up synthesised a segment of 1e300 s
    ("Maximum allowed size exceeded"); one 4-second segment is what the track holds."""
    lines: list[str] = []
    code = demo.run_demo(seconds=4.0, segment_seconds=1e300, workers=2, progress=False,
                         sample=0, out=lines.append)
    assert code == 0, lines
    assert any("in 1 segments of 4 s" in line for line in lines), lines
