"""Pipelines on real worker processes: every segment gets one outcome naming the stage that
failed, later stages are skipped, independent branches and other segments go on, groups run
at the same time, and stopping a run leaves nothing running."""

from __future__ import annotations

import asyncio
import gc
import io
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _pipeline_tasks as pt
import _tasks
import stagepool as sp
from conftest import WAIT, shm_entries, wait_until
from stagepool._pipeline._declare import plan_groups
from stagepool._pipeline._meter import make_meter
from stagepool._pipeline._translate import Segment

STAGES = [name for name, _ in pt.diamond_stages()]


def diamond(**options: dict[str, Any]) -> sp.Pipeline:
    """decode -> resample -> (features, loudness) -> encode; ``options`` per stage name."""
    p = sp.Pipeline()
    for name, after in pt.diamond_stages():
        p.stage(name, pt.Step(name), after=after, **options.get(name, {}))
    return p


def expected_kinds(plan: dict[str, str]) -> dict[str, str]:
    """What each diamond stage should record for a segment with this plan (errors only)."""
    kinds: dict[str, str] = {}
    for name, after in pt.diamond_stages():
        if any(kinds[d] != "ok" for d in after):
            kinds[name] = "skipped"
        else:
            kinds[name] = "error" if plan.get(name) == "error" else "ok"
    return kinds


# ---- declaring ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("declare", "error", "words"), [
    (lambda p: p.stage("a", pt.first).stage("a", pt.first), ValueError, "'a' is declared twice"),
    (lambda p: p.stage("b", pt.first, after="a"), ValueError, "names no stage declared before"),
    (lambda p: p.stage("a", pt.first, after="a"), ValueError, "cannot come after itself"),
    (lambda p: p.stage("a", 42), TypeError, "stage 'a': fn must be callable"),
    (lambda p: p.stage("a", pt.first, timeout=-1), ValueError, "stage 'a': timeout"),
    (lambda p: p.stage("a", pt.first, retries=1.5), TypeError, "stage 'a': retries"),
    (lambda p: p.stage("a", pt.first, max_concurrent=0), ValueError, "stage 'a': max_concurrent"),
    (lambda p: p.stage("a", pt.first, chunk_size=0), ValueError, "stage 'a': chunk_size"),
    (lambda p: p.stage("a", pt.first, mem_per_task="lots"), ValueError, "stage 'a': mem_per_task"),
    (lambda p: p.stage("a", pt.first, setup=3), TypeError, "stage 'a': setup must be callable"),
    (lambda p: p.stage("a", pt.first, retry_on=("nope",)), ValueError, "stage 'a': retry_on"),
    (lambda p: p.stage("", pt.first), TypeError, "non-empty str"),
])
def test_a_bad_declaration_is_refused_naming_the_stage(declare: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        declare(sp.Pipeline())


def test_bad_run_arguments_are_refused_before_anything_starts(local_engine: sp.Engine) -> None:
    with pytest.raises(ValueError, match="no stages"):
        local_engine.run(sp.Pipeline(), [1])
    with pytest.raises(TypeError, match=r"must be a stagepool\.Pipeline"):
        local_engine.run(pt.first, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_failure_ratio"):
        local_engine.run(diamond(), [1], max_failure_ratio=2)
    with pytest.raises(TypeError, match="window"):
        local_engine.run_iter(diamond(), [1], window="big")  # type: ignore[arg-type]


def test_groups_fuse_what_may_share_a_task() -> None:
    p = diamond(features={"max_concurrent": 1})
    groups = plan_groups(p.stages)
    names = [[p.stages[i].name for i in g.stages] for g in groups]
    # loudness, declared after the capped stage, still fuses with the stages before it.
    assert names == [["decode", "resample", "loudness"], ["features"], ["encode"]]
    timed = diamond(loudness={"timeout": 5.0})
    assert [[timed.stages[i].name for i in g.stages] for g in plan_groups(timed.stages)] == [
        ["decode", "resample", "features"], ["loudness"], ["encode"]]  # encode reads loudness


# ---- one outcome per segment, on every backend -----------------------------------------------------


def test_a_diamond_runs_every_segment_in_order(engine: sp.Engine) -> None:
    report = engine.run(diamond(), [pt.seg(i) for i in range(12)])
    assert len(report) == 12 and report.ok and report.success_rate == 1.0
    for i, value in enumerate(report.values):
        assert value == (i, {}, ("decode", "features", "loudness", "resample", "encode"))
    assert all(st_.counts == {"ok": 12} for st_ in report.stages.values())
    assert "12 segments: 12 ok" in report.summary()
    assert [s.index for s in engine.run_iter(diamond(), [pt.seg(i) for i in range(7)])] == \
        list(range(7))


def test_several_leaves_give_a_dict(engine: sp.Engine) -> None:
    p = sp.Pipeline().stage("a", pt.Step("a")).stage("b", pt.Step("b"), after="a")
    p.stage("c", pt.Step("c"), after="a")
    (seg,) = engine.run(p, [pt.seg(0)])
    assert seg.value == {"b": (0, {}, ("a", "b")), "c": (0, {}, ("a", "c"))}


@pytest.mark.parametrize("stage", STAGES)
def test_an_error_at_any_stage_skips_its_dependants_only(engine: sp.Engine, stage: str) -> None:
    plan = {stage: "error"}
    report = engine.run(diamond(), [pt.seg(i, **(plan if i == 3 else {})) for i in range(6)])
    bad = report[3]
    assert not bad.ok and bad.kind == "error" and bad.stage == stage
    assert isinstance(bad.error, ValueError) and f"stage {stage!r}" in str(bad.error.__notes__)
    assert {n: s.kind for n, s in bad.stages.items()} == expected_kinds(plan)
    assert all(s.cause == stage for s in bad.stages.values() if s.kind == "skipped")
    assert [s.ok for s in report] == [True] * 3 + [False] + [True] * 2
    if stage in ("features", "loudness"):  # the other branch went on, and is a leaf? no: joined
        other = "loudness" if stage == "features" else "features"
        assert bad.stages[other].kind == "ok"
    assert report.stages[stage].counts == {"ok": 5, "error": 1}
    with pytest.raises(ExceptionGroup):
        report.raise_on_failure()


def test_retries_rerun_a_stage_in_its_worker(engine: sp.Engine, tmp_path: Path) -> None:
    p = sp.Pipeline().stage("a", pt.first).stage(
        "flaky", _tasks.fail_on, after="a", retries=2, retry_on=(ValueError,))
    # fail_on((x, True)) raises ValueError each time: three real runs, then the error.
    (seg,) = engine.run(p, [(1, True)])
    assert seg.kind == "error" and seg.stages["flaky"].attempts == 3


def test_a_late_stage_is_a_timeout_without_killing(engine: sp.Engine) -> None:
    report = engine.run(diamond(loudness={"timeout": 0.3, "fuse": False}),
                        [pt.seg(0, loudness="late"), pt.seg(1)])
    assert report[0].kind == "timeout" and report[0].stage == "loudness"
    assert isinstance(report[0].error, sp.TaskTimeout)
    assert report[0].stages["encode"].kind == "skipped" and report[1].ok


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(STAGES), st.just("error"), max_size=2),
                min_size=0, max_size=25), st.booleans())
def test_order_and_completeness_on_a_mix_of_failures(
        local_engine: sp.Engine, plans: list[dict[str, str]], cap: bool) -> None:
    options = {"features": {"max_concurrent": 1}} if cap else {}
    segments = [pt.seg(i, **plan) for i, plan in enumerate(plans)]
    report = local_engine.run(diamond(**options), segments)
    assert [s.index for s in report] == list(range(len(plans)))
    for seg, plan in zip(report, plans, strict=True):
        kinds = expected_kinds(plan)
        assert {n: s.kind for n, s in seg.stages.items()} == kinds
        assert seg.ok == all(k == "ok" for k in kinds.values())
        failed = [n for n in STAGES if kinds[n] == "error"]
        assert seg.stage == (failed[0] if failed else None)
        assert all(s.attempts == (0 if s.kind == "skipped" else 1) for s in seg.stages.values())
    streamed = list(local_engine.run_iter(diamond(**options), segments, window=3))
    assert [s.index for s in streamed] == list(range(len(plans)))


# ---- crashes and hangs name the stage --------------------------------------------------------------


@pytest.mark.needs("survives_crash", "hard_timeouts")
@pytest.mark.parametrize("how", ["crash", "segfault", "hang"])
@pytest.mark.parametrize("stage", ["decode", "loudness", "encode"])
def test_a_dead_or_hung_stage_is_named(engine: sp.Engine, how: str, stage: str) -> None:
    # a fused group's hard limit is the sum of its stages' timeouts: 5 s for a hang here
    p = diamond(**{name: {"timeout": 1.0} for name in STAGES})
    report = engine.run(p, [pt.seg(i, **({stage: how} if i == 1 else {})) for i in range(4)])
    bad = report[1]
    kind = "timeout" if how == "hang" else "crash"
    assert bad.kind == kind and bad.stage == stage, bad
    notes = str(bad.error.__notes__)  # type: ignore[union-attr]
    assert f"stage {stage!r}" in notes
    assert ("sum of their timeouts" in notes) == (how == "hang")
    assert all(s.kind in ("ok", "skipped") for n, s in bad.stages.items() if n != stage)
    downstream = {"decode": STAGES[1:], "loudness": ["encode"], "encode": []}[stage]
    assert all(bad.stages[n].kind == "skipped" for n in downstream)
    # the stages that ran before it ran fine (it ran only because they did; "features" does
    # not feed "loudness" but ran before it): once "skipped" because of it, attempts 0
    upstream = {"decode": [], "loudness": ["decode", "resample", "features"],
                "encode": STAGES[:-1]}[stage]
    assert all((bad.stages[n].kind, bad.stages[n].attempts) == ("ok", 1) for n in upstream), \
        bad.stages
    assert [s.ok for s in report] == [True, False, True, True]
    assert engine.run(diamond(), [pt.seg(0)]).ok  # the engine still serves


@pytest.mark.needs("survives_crash", "hard_timeouts")
@pytest.mark.parametrize(("how", "kind", "ended"), [
    ("crash", "crash", "which then died in stage 'loudness'"),
    ("hang", "timeout", "which then was stopped at its time limit in stage 'loudness'")])
def test_a_stage_that_failed_before_a_crash_in_its_group_still_reads_failed(
        engine: sp.Engine, how: str, kind: str, ended: str) -> None:
    """"features" raises, then the worker dies (or is killed at the limit) in "loudness" (same
    fused group): the records died with it, but its breadcrumb said how the stages before
    ended. "features" reads "error" (what it raised is lost: the message says so, and how the
    worker ended), not "skipped" because of the crash."""
    p = diamond(**{name: {"timeout": 1.0} for name in STAGES})
    report = engine.run(p, [pt.seg(0, features="error", loudness=how)])
    stages = report[0].stages
    kinds = {name: (stage.kind, stage.attempts) for name, stage in stages.items()}
    assert kinds == {"decode": ("ok", 1), "resample": ("ok", 1), "features": ("error", 1),
                     "loudness": (kind, 1), "encode": ("skipped", 0)}, kinds
    message = str(stages["features"].error)
    assert "was lost" in message and ended in message, message
    assert report[0].stage == "features"  # the first stage in order that did not end ok


@pytest.mark.needs("survives_crash")
def test_a_stage_retried_in_its_worker_before_a_crash_counts_its_runs(
        engine: sp.Engine) -> None:
    """"features" raises once and passes on its retry (in the worker), then the worker dies in
    "loudness": the breadcrumb said only "ended ok", so "features" read 1 attempt for 2 runs."""
    report = engine.run(diamond(features={"retries": 1}),
                        [pt.seg(0, features="flaky", loudness="crash")])
    kinds = {name: (stage.kind, stage.attempts) for name, stage in report[0].stages.items()}
    assert kinds == {"decode": ("ok", 1), "resample": ("ok", 1), "features": ("ok", 2),
                     "loudness": ("crash", 1), "encode": ("skipped", 0)}, kinds


@pytest.mark.needs("survives_crash")
def test_the_stage_a_worker_died_in_counts_its_retries_in_the_worker(engine: sp.Engine) -> None:
    """"loudness" raises, is retried in its worker (retries=1) and kills it on the retry: it
    ran twice, and read attempts 1 (the group's one run)."""
    report = engine.run(diamond(loudness={"retries": 1}), [pt.seg(0, loudness="flaky-crash")])
    kinds = {name: (stage.kind, stage.attempts) for name, stage in report[0].stages.items()}
    assert kinds == {"decode": ("ok", 1), "resample": ("ok", 1), "features": ("ok", 1),
                     "loudness": ("crash", 2), "encode": ("skipped", 0)}, kinds


@pytest.mark.needs("survives_crash")
def test_a_group_rerun_counts_the_retries_in_the_worker_that_died(
        engine: sp.Engine, tmp_path: Path) -> None:
    """Each run of the group (in a fresh worker): "features" raises and passes on its retry in
    the worker; the first run's worker then dies in "loudness", the group runs again
    (retry_on crash) and all pass. "features" ran 4 times and read 3: the dead run was
    counted as one run of each stage."""
    p = diamond(features={"retries": 1}, loudness={"retries": 1, "retry_on": ("crash",)})
    report = engine.run(p, [pt.seg(0, features="flaky", loudness=f"crash-once:{tmp_path}")])
    kinds = {name: (stage.kind, stage.attempts) for name, stage in report[0].stages.items()}
    assert kinds == {"decode": ("ok", 2), "resample": ("ok", 2), "features": ("ok", 4),
                     "loudness": ("ok", 2), "encode": ("ok", 1)}, kinds


@pytest.mark.needs("survives_crash")
def test_a_group_of_more_than_63_stages_says_how_each_ended_before_a_crash(
        engine: sp.Engine) -> None:
    """70 fused stages reading the first; the 65th raises, the 69th kills its worker. The
    breadcrumb's masks held 63 stages: the ones from there on that ran before the crash read
    "skipped" with 0 attempts, the 65th's failure hidden among them."""
    p = sp.Pipeline().stage("s0", pt.Step("s0"))
    for i in range(1, 70):
        p.stage(f"s{i}", pt.Step(f"s{i}"), after="s0")
    report = engine.run(p, [pt.seg(0, s64="error", s68="crash")])
    kinds = {name: (stage.kind, stage.attempts) for name, stage in report[0].stages.items()}
    expected = {f"s{i}": ("ok", 1) for i in range(68)}
    expected |= {"s64": ("error", 1), "s68": ("crash", 1), "s69": ("skipped", 0)}
    assert kinds == expected, {n: k for n, k in kinds.items() if expected[n] != k}
    assert report[0].stage == "s64"


@pytest.mark.needs("survives_crash")
def test_a_later_groups_messages_name_the_segment(engine: sp.Engine) -> None:
    """A later group's batch takes segments as they finish upstream, not in input order: its
    messages name the segment (they once named the batch's own count: "item 1" for segment 0)."""
    p = sp.Pipeline().stage("decode", pt.Step("decode")).stage(
        "encode", pt.Step("encode"), after="decode", fuse=False)
    plans = [{"decode": "late", "encode": "crash"}, {}, {}, {}]  # segment 0 reaches encode last
    report = engine.run(p, [pt.seg(i, **plan) for i, plan in enumerate(plans)])
    bad = report[0]
    assert (bad.kind, bad.stage) == ("crash", "encode"), bad
    assert "while running item 0 " in str(bad.error), bad.error
    assert [s.ok for s in report] == [False, True, True, True]


@pytest.mark.needs("serializes")
def test_a_value_that_cannot_travel_back_names_the_stage_that_made_it(engine: sp.Engine) -> None:
    """Only the values a group sends back are pickled: of a fused group decode -> resample,
    only resample's. Once, the group's first stage was blamed (decode, which returned fine)."""
    p = sp.Pipeline().stage("decode", pt.Step("decode")).stage(
        "resample", pt.Step("resample"), after="decode")
    report = engine.run(p, [pt.seg(i, **({"resample": "unpicklable"} if i == 1 else {}))
                            for i in range(3)])
    bad = report[1]
    assert (bad.kind, bad.stage) == ("serialization", "resample"), bad
    assert "fused stages" not in str(getattr(bad.error, "__notes__", "")), bad.error
    assert [s.ok for s in report] == [True, False, True]
    # decode ran: it once read "skipped" because of resample, and the message named an
    # internal type (the group's GroupResult) instead of the stage
    assert bad.stages["decode"].kind == "ok", bad.stages
    assert "stage 'resample'" in str(bad.error) and "GroupResult" not in str(bad.error)


@pytest.mark.needs("serializes")
def test_a_value_that_cannot_travel_fails_its_stage_alone(engine: sp.Engine) -> None:
    """In a fused group decode -> (resample, loud), resample's unpicklable value fails resample
    only: loud, which ran beside it, keeps its outcome, and a later group's stage that reads
    resample is skipped because of it."""
    p = (sp.Pipeline().stage("decode", pt.Step("decode"))
         .stage("resample", pt.Step("resample"), after="decode")
         .stage("loud", pt.Step("loud"), after="decode")
         .stage("encode", pt.Step("encode"), after="resample", fuse=False))
    report = engine.run(p, [pt.seg(i, **({"resample": "unpicklable"} if i == 1 else {}))
                            for i in range(3)])
    bad = report[1]
    kinds = {name: (stage.kind, stage.cause) for name, stage in bad.stages.items()}
    assert kinds == {"decode": ("ok", None), "resample": ("serialization", None),
                     "loud": ("ok", None), "encode": ("skipped", "resample")}, kinds
    assert [s.ok for s in report] == [True, False, True]


@pytest.mark.needs("serializes")
def test_a_stage_function_that_cannot_be_pickled_is_named(engine: sp.Engine) -> None:
    """Every segment fails, in the stage whose function will not pickle (once: in the group's
    first stage, with the whole group's internals printed as 'the function')."""
    p = sp.Pipeline().stage("decode", pt.Step("decode")).stage(
        "resample", pt.LockedStep("resample"), after="decode")
    report = engine.run(p, [pt.seg(i) for i in range(2)])
    for seg in report:
        assert (seg.kind, seg.stage) == ("serialization", "resample"), seg
        assert "LockedStep" in str(seg.error) and "StageCall" not in str(seg.error), seg.error


@pytest.mark.needs("survives_crash")
def test_crash_in_retry_on_reruns_the_group(engine: sp.Engine, tmp_path: Path) -> None:
    p = sp.Pipeline().stage("a", pt.first).stage(
        "fragile", pt.crash_once, after="a", retries=1, retry_on=("crash",))
    report = engine.run(p, [(i, str(tmp_path)) for i in range(3)])
    assert report.values == [0, 1, 2]
    assert all(seg.stages["fragile"].attempts == 2 for seg in report)


@pytest.mark.needs("survives_crash")
def test_a_group_rerun_counts_only_the_stages_that_ran(engine: sp.Engine, tmp_path: Path) -> None:
    # The worker died in "fragile": "after" had not run then, so it ran once, not twice.
    tally = pt.Tally(str(tmp_path))
    p = sp.Pipeline().stage("a", pt.first).stage(
        "fragile", pt.crash_once, after="a", retries=1, retry_on=("crash",)).stage(
        "after", tally, after="fragile")
    (seg,) = engine.run(p, [(0, str(tmp_path))])
    assert seg.ok, seg
    attempts = {name: stage.attempts for name, stage in seg.stages.items()}
    assert attempts == {"a": 2, "fragile": 2, "after": tally.runs(0)} == {
        "a": 2, "fragile": 2, "after": 1}


# ---- groups ---------------------------------------------------------------------------------------


def test_groups_run_together_and_pass_failures_on(engine: sp.Engine) -> None:
    p = diamond(resample={"max_concurrent": 1}, features={"chunk_size": 2})
    plans = [{}, {"decode": "error"}, {"loudness": "error"}, {"features": "error"}, {}]
    report = engine.run(p, [pt.seg(i, **plan) for i, plan in enumerate(plans)])
    for seg, plan in zip(report, plans, strict=True):
        assert {n: s.kind for n, s in seg.stages.items()} == expected_kinds(plan)
    assert report[3].stages["loudness"].kind == "ok"  # the independent branch went on


def test_progress_shows_every_stage(serial_engine: sp.Engine,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    plans = [{}, {"decode": "error"}, {}, {"loudness": "error"}, {}]
    report = serial_engine.run(diamond(), [pt.seg(i, **p) for i, p in enumerate(plans)],
                               progress=True, desc="segs")
    assert len(report.failed) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("segs: decode 5/5 (1 failed) | resample 5/5 | features 5/5 | "
                           "loudness 5/5 (1 failed) | encode 5/5; 5/5 segments done, 2 failed")


def test_on_progress_counts_each_stage_exactly(engine: sp.Engine) -> None:
    plans = [{}, {"decode": "error"}, {}, {"loudness": "error"}, {}, {"encode": "error"}, {}]
    seen: list[sp.Progress] = []
    report = engine.run(diamond(), [pt.seg(i, **p) for i, p in enumerate(plans)],
                        on_progress=seen.append)
    assert len(report.failed) == 3
    end = seen[-1]
    assert (end.done, end.failed, end.total) == (7, 3, 7) and end.stages is not None
    assert {name: (s.done, s.failed) for name, s in end.stages.items()} == {
        "decode": (7, 1), "resample": (7, 0), "features": (7, 0), "loudness": (7, 1),
        "encode": (7, 1)}  # skipped stages are done, not failed
    for before, after in itertools.pairwise(seen):  # counts only grow
        assert after.stages is not None and before.stages is not None
        assert all(after.stages[n].done >= before.stages[n].done for n in STAGES)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_per_stage_with_the_slowest_eta() -> None:
    out = _Tty()
    meter = make_meter(["decode", "encode"], 4, progress=True, on_progress=None, desc="x",
                       file=out)
    assert meter is not None
    for i in range(4):
        seg = Segment(i, {}, {"decode": sp.StageOutcome("decode", "ok"),
                              "encode": sp.StageOutcome("encode", "error" if i else "ok")})
        meter.stages_done(seg, ["decode"])
        if i < 2:
            meter.stages_done(seg, ["encode"])
    now = meter.reading()
    assert now.stages is not None and now.eta == now.stages["encode"].eta
    assert now.stages["decode"].eta == 0.0 and now.eta is not None and now.eta > 0
    meter.close()
    text = out.getvalue()
    assert "decode" in text and "4/4" in text and "2/4" in text and "1 failed" in text
    assert "(slowest)" in text


def test_a_raising_on_progress_is_dropped_and_the_run_goes_on(
        serial_engine: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def broken(_: sp.Progress) -> None:
        calls.append(1)
        raise RuntimeError("bad callback")

    assert serial_engine.run(diamond(), [pt.seg(i) for i in range(4)], on_progress=broken).ok
    assert len(calls) == 1 and "bad callback" in caplog.text
    with pytest.raises(TypeError, match="on_progress must be a callable"):
        serial_engine.run(diamond(), [pt.seg(0)], on_progress=3)  # type: ignore[arg-type]


# ---- cost hints and admission ------------------------------------------------------------------------


def test_cost_admits_the_longest_first_and_keeps_input_order(engine: sp.Engine,
                                                            tmp_path: Path) -> None:
    log = tmp_path / "order"
    mix = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    p = sp.Pipeline().stage("start", pt.log_start).stage("again", pt.first, after="start")
    report = engine.run(p, [(v, str(log)) for v in mix], cost=lambda item: item[0], window=1)
    assert report.values == mix  # in input order
    assert [int(v) for v in log.read_text().split()] == sorted(mix, reverse=True)
    assert [s.index for s in report] == list(range(len(mix)))


def test_a_cost_that_raises_fails_its_segment_alone(engine: sp.Engine) -> None:
    report = engine.run(diamond(), [pt.seg(i) for i in range(5)],
                        cost=lambda seg: abs(1 / (seg[0] - 2)))
    bad = report[2]
    assert (bad.ok, bad.kind, bad.stage) == (False, "error", "decode")
    assert isinstance(bad.error, ValueError)
    assert "cost(item 2) raised ZeroDivisionError" in str(bad.error)
    assert {n: s.kind for n, s in bad.stages.items() if n != "decode"} == dict.fromkeys(
        STAGES[1:], "skipped")
    assert [s.ok for s in report] == [True, True, False, True, True]
    with pytest.raises(TypeError, match="cost must be a callable"):
        engine.run(diamond(), [pt.seg(0)], cost=3)  # type: ignore[arg-type]


def test_later_groups_drain_before_new_segments_enter(local_engine: sp.Engine) -> None:
    # A first group quicker than a capped later one: without drain-before-fill the first group
    # would run ahead and pile segments up before the bottleneck.
    p = sp.Pipeline().stage("first", pt.nap).stage("capped", pt.long_nap, after="first",
                                                   max_concurrent=1)
    ahead: list[int] = []

    def watch(now: sp.Progress) -> None:
        assert now.stages is not None
        ahead.append(now.stages["first"].done - now.stages["capped"].done)

    report = local_engine.run(p, range(30), window=3, on_progress=watch)
    assert report.ok and report.values == list(range(30))
    assert max(ahead) <= 3  # every segment between the two stages holds a place in the window
    assert max(ahead) >= 2  # and the window was used: the first group did run ahead


def test_setup_runs_once_per_worker_and_its_failure_is_named(local_engine: sp.Engine) -> None:
    p = sp.Pipeline().stage("model", pt.with_ctx, setup=pt.make_ctx)
    report = local_engine.run(p, range(40), window=4)
    ctxs = {v[1] for v in report.values}
    assert len({pid for pid, _ in ctxs}) == len(ctxs)  # one setup per worker
    broken = sp.Pipeline().stage("model", pt.with_ctx, setup=pt.broken_setup)
    report = local_engine.run(broken, range(3))
    assert {s.kind for s in report} == {"error"}
    assert isinstance(report[0].error, sp.InitializerError)
    assert "setup of stage 'model' failed" in str(report[0].error)


def test_teardown_runs_when_the_worker_exits(tmp_path: Path) -> None:
    p = sp.Pipeline().stage("model", pt.with_ctx, setup=pt.make_ctx,
                            teardown=pt.noted_teardown_factory(str(tmp_path)))
    with sp.Engine(workers=1) as eng:
        (seg,) = eng.run(p, [1])
    assert wait_until(lambda: (tmp_path / f"teardown-{seg.value[1][0]}").exists(), timeout=WAIT)


def test_a_teardown_that_raises_is_logged_with_its_stage(caplog: pytest.LogCaptureFixture) -> None:
    p = sp.Pipeline().stage("model", pt.with_ctx, setup=pt.make_ctx, teardown=pt.broken_teardown)
    with caplog.at_level(logging.WARNING, logger="stagepool.worker"):
        with sp.Engine(workers=1) as eng:
            (seg,) = eng.run(p, [1])
            assert seg.ok
        logged = [r.getMessage() for r in caplog.records]
    assert any("teardown of stage 'model' failed" in m and "model file locked" in m
               for m in logged), logged


# ---- stopping ---------------------------------------------------------------------------------------


def test_max_failure_ratio_stops_early_with_the_partial_report(local_engine: sp.Engine) -> None:
    segments = [pt.seg(i, resample="error" if i % 2 else "slow") for i in range(40)]
    with pytest.raises(sp.PipelineAborted, match=r"max_failure_ratio=0\.1") as info:
        local_engine.run(diamond(), segments, max_failure_ratio=0.1, window=4)
    partial = info.value.report
    assert 5 <= len(partial) < 40 and len(partial.failed) == 5


def test_a_failing_items_iterable_propagates_with_the_report(engine: sp.Engine) -> None:
    def items() -> Iterator[Any]:
        yield from (pt.seg(i) for i in range(3))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone") as info:
        engine.run(diamond(), items())
    assert len(info.value.report) == 3 and info.value.report.ok  # type: ignore[attr-defined]


def _settled(folder: Path) -> int:
    """The number of files once no new one has appeared for 0.6 s: nothing is running."""
    seen = -1
    while seen != len(list(folder.iterdir())):
        seen = len(list(folder.iterdir()))
        time.sleep(0.6)
    return seen


def test_closing_the_stream_mid_pipeline_stops_the_run(engine: sp.Engine, tmp_path: Path) -> None:
    p = sp.Pipeline().stage("a", pt.first).stage("touch", pt.touch_then_pass, after="a")
    stream = engine.run_iter(p, ((i, str(tmp_path)) for i in itertools.count()), window=4)
    got = [next(stream).index for _ in range(3)]
    stream.close()  # type: ignore[attr-defined]
    assert got == [0, 1, 2]
    ran = _settled(tmp_path)
    assert ran <= 3 + 4 + 2  # the window, and what was running; an endless input cut off early
    assert engine.run(diamond(), [pt.seg(0)]).ok
    assert not _segments_left()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("call", ["run", "run_iter"])
def test_shutdown_kill_from_another_thread_gives_every_segment_an_outcome(
        tmp_path: Path, fused: bool, call: str) -> None:
    """A shutdown(kill=True) while segment 2 hangs: the segments that ran, ran and those
    waiting for room in the window were dropped from the report (12 in, 2 or 3 out)."""
    eng = sp.Engine(workers=2)
    p = sp.Pipeline().stage("a", pt.first)
    p.stage("hang", _tasks.note_runs_then_sleep, after="a", fuse=fused)
    work = [(i, 600.0 if i == 2 else 0.0, str(tmp_path)) for i in range(12)]
    try:
        killer = threading.Thread(target=lambda: (
            wait_until(lambda: (tmp_path / "2").exists()), eng.shutdown(kill=True)), daemon=True)
        killer.start()
        outcomes = list(eng.run(p, work, window=4) if call == "run" else
                        eng.run_iter(p, work, window=4))
        killer.join(WAIT)
    finally:
        eng.shutdown(kill=True)
    assert sorted(o.index for o in outcomes) == list(range(12))
    for o in outcomes:  # what never ran says so; a segment that finished before the kill is ok
        assert o.ok or o.kind == "cancelled", (o.index, o.kind, o.error)
        assert o.ok or isinstance(o.error, sp.TaskCancelled), (o.index, o.error)
    assert not outcomes[2].ok and not _segments_left()
    # the stage that was killed is named, not the first one of its group, which ran fine
    hung = outcomes[2].stages
    assert (outcomes[2].stage, hung["a"].kind, hung["hang"].kind) == ("hang", "ok", "cancelled"), \
        hung
    # it ran when killed, as an item of a map killed while running (it read 0)
    assert (hung["a"].attempts, hung["hang"].attempts) == (1, 1), hung


@pytest.mark.asyncio
@pytest.mark.parametrize("on_cancel", ["finish", "kill"])
async def test_cancelling_run_async_stops_the_run(
        local_engine: sp.Engine, tmp_path: Path, on_cancel: Any) -> None:
    async def items() -> AsyncIterator[tuple[int, str]]:
        for i in range(200):
            yield (i, str(tmp_path))

    p = sp.Pipeline().stage("a", pt.first).stage("touch", pt.touch_then_pass, after="a")
    task = asyncio.create_task(local_engine.run_async(p, items(), window=4, on_cancel=on_cancel))
    await asyncio.sleep(0.7)
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert time.monotonic() - started < 1.0
    ran = await asyncio.to_thread(_settled, tmp_path)
    assert ran < 20
    report = await asyncio.wait_for(local_engine.run_async(diamond(), [pt.seg(0)]), WAIT)
    assert report.ok


@pytest.mark.asyncio
async def test_run_iter_async_streams_in_order(local_engine: sp.Engine) -> None:
    async def items() -> AsyncIterator[Any]:
        for i in range(10):
            yield pt.seg(i, features="error" if i == 4 else "")

    got = []
    async with local_engine.run_iter_async(diamond(), items(), ordered=True) as stream:
        async for seg in stream:
            got.append((seg.index, seg.kind))
    assert got == [(i, "error" if i == 4 else "ok") for i in range(10)]


@pytest.mark.asyncio
async def test_cancelling_the_consumer_of_run_iter_async_stops_the_run(
        local_engine: sp.Engine, tmp_path: Path) -> None:
    p = sp.Pipeline().stage("a", pt.first).stage("touch", pt.touch_then_pass, after="a")

    async def consume() -> None:
        async for _ in local_engine.run_iter_async(p, [(i, str(tmp_path)) for i in range(200)],
                                                   window=4):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.7)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert await asyncio.to_thread(_settled, tmp_path) < 20


# ---- memory -------------------------------------------------------------------------------------------


def _segments_left() -> set[str]:
    return {name for name in shm_entries() if name.startswith("stagepool-")}


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem")) // 1024


def test_memory_is_bounded_by_the_window(local_engine: sp.Engine) -> None:
    # 256 x 8 MiB (2 GiB) in; each segment makes two more 8 MiB arrays, one of which crosses
    # between groups (shift has a batch of its own) and one that comes back. The parent holds
    # the window's segments, never a growing share of the 6 GiB that pass through.
    p = sp.Pipeline().stage("scale", pt.scale).stage("shift", pt.shift, after="scale",
                                                     max_concurrent=2)

    def segments() -> Iterator[Any]:
        for i in range(256):
            yield pt.make_array(i)

    gc.collect()
    base = peak = _rss_mib()
    seen = 0
    for seg in local_engine.run_iter(p, segments(), window=4):
        assert seg.ok and float(seg.value[0]) == 2.0 * seg.index + 1
        seen += 1
        del seg
        peak = max(peak, _rss_mib())
    assert seen == 256
    assert peak - base <= 4 * 3 * 8 + 64, f"parent grew {peak - base} MiB"
    assert not _segments_left()
