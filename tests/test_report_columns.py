"""The report's columns: values laid out at build, durations and workers at the first look.

Runs arrive in any order; a retry's run may fall inside an earlier one (it wins: arrival order);
failures fill the gaps. Whichever column is read first, and whether the report was pickled
before or after, every item reads the same."""

from __future__ import annotations

import pickle
from array import array

import pytest

from stagepool._outcome import BatchStats, Failure, ReportBuilder

STATS = BatchStats(items=8, wall_time=1.0, busy_time=1.0, workers=2, chunks=3, chunk_size=3.0)


def _build() -> ReportBuilder:
    builder = ReportBuilder(8)
    builder.place(4, ["e", "f", "g", "h"], array("d", [0.4, 0.5, 0.6, 0.7]), 22)
    builder.place(0, ["a", None, "c"], array("d", [0.0, 0.1, 0.2]), 11)
    builder.fail(3, Failure("crash", RuntimeError("died"), None, 3.0, 33, 1))
    builder.place(5, ["F"], array("d", [9.0]), 44, attempts=2)  # a retry inside the first run
    builder.fail(1, Failure("error", ValueError("bad"), None, 1.0, 11, 1))
    return builder


EXPECTED = [  # (ok, value, duration, worker, attempts)
    (True, "a", 0.0, 11, 1), (False, None, 1.0, 11, 1), (True, "c", 0.2, 11, 1),
    (False, None, 3.0, 33, 1), (True, "e", 0.4, 22, 1), (True, "F", 9.0, 44, 2),
    (True, "g", 0.6, 22, 1), (True, "h", 0.7, 22, 1),
]


def _rows(report: object) -> list[tuple[object, ...]]:
    return [(o.ok, o.value, o.duration, o.worker, o.attempts) for o in report]  # type: ignore[attr-defined]


@pytest.mark.parametrize("pickled", ["before", "after", "never"])
def test_every_item_reads_its_own_run_whatever_the_order(pickled: str) -> None:
    report = _build().build(8, STATS)
    assert report.values == ["a", "c", "e", "F", "g", "h"]
    assert report.values_or("x") == ["a", "x", "c", "x", "e", "F", "g", "h"]
    if pickled == "before":
        report = pickle.loads(pickle.dumps(report))
    assert _rows(report) == EXPECTED
    if pickled == "after":
        report = pickle.loads(pickle.dumps(report))
        assert _rows(report) == EXPECTED
    assert [o.kind for o in report.failed] == ["error", "crash"]


def test_a_report_shorter_than_its_runs_is_cut_and_a_gap_is_padded() -> None:
    builder = ReportBuilder(6)
    builder.place(0, [1, 2], array("d", [0.5, 0.5]), 7)
    builder.place(4, [5, 6, 7], array("d", [0.1, 0.2, 0.3]), 8)  # past the size: cut
    builder.fail(2, Failure("cancelled", RuntimeError("cancelled"), None, 0.0, None, 0))
    builder.fail(3, Failure("cancelled", RuntimeError("cancelled"), None, 0.0, None, 0))
    report = builder.build(5, STATS)
    assert len(report) == 5 and report.values == [1, 2, 5]
    assert [(o.duration, o.worker) for o in report] == [
        (0.5, 7), (0.5, 7), (0.0, None), (0.0, None), (0.1, 8)]


def test_overlapping_runs_are_written_in_arrival_order_not_by_position() -> None:
    builder = ReportBuilder(3)
    builder.place(1, ["late"], array("d", [5.0]), 2)
    builder.place(0, ["a", "b", "c"], array("d", [1.0, 2.0, 3.0]), 1, attempts=2)  # arrived last
    report = builder.build(3, STATS)
    assert report.values == ["a", "b", "c"]
    assert [(o.duration, o.worker, o.attempts) for o in report] == [
        (1.0, 1, 2), (2.0, 1, 2), (3.0, 1, 2)]


@pytest.mark.parametrize("keys", [None, [f"k{i}" for i in range(2_500)]])
def test_iterating_an_all_ok_report_reads_what_indexing_reads(keys: list[str] | None) -> None:
    """An all-ok report is iterated a block of outcomes at a time (C loops): every outcome
    equals the one indexing builds item by item (index, value, duration, worker, attempts, key),
    a worker pid of 0 (unknown) reading None as it does there; and so does ``successful``."""
    builder = ReportBuilder(2_500)
    builder.place(1_000, list(range(1_000, 2_500)), array("d", [0.5]) * 1_500, 0)
    builder.place(0, [str(i) for i in range(1_000)], array("d", range(1_000)), 77)
    report = builder.build(2_500, STATS, keys)
    by_index = [report[i] for i in range(len(report))]
    assert list(report) == by_index == report.successful
    assert [type(o) for o in report] == [type(by_index[0])] * 2_500
    assert report[1_500].worker is None and report[10].worker == 77
    assert [o.key for o in report] == (keys or [None] * 2_500)
