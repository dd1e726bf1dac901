"""Cost hints (issue 14): longest-first dispatch, chunks cut by cost, bad costs, progress in
seconds of media and its cost-weighted ETA."""

from __future__ import annotations

import asyncio
import heapq
import io
import itertools
import math
import random

import pytest

import stagepool as sp
from _cost_tasks import Segment, exit_on_41, stamp
from stagepool._costs import Arrangement, CostSizer, cost_hints
from stagepool._progress import Reading, estimate_eta, make_sink

LONG = (60.0, 50.0, 40.0, 30.0)


def mix() -> list[Segment]:
    """40 short segments, then the 4 long ones last: the worst input order for a plain map."""
    lengths = [2.0] * 40 + list(LONG)
    return [Segment(n, s) for n, s in enumerate(lengths)]


def seconds(seg: Segment) -> float:
    return seg.seconds


def start_order(report: sp.BatchReport[tuple[float, int, int]], segs: list[Segment]) -> list[float]:
    """The items' lengths in the order they started in the workers."""
    return [segs[n].seconds for _, _, n in sorted(report.values)]


# ---- longest-first ----------------------------------------------------------------------------


def test_map_starts_the_longest_items_first_and_keeps_input_order(engine: sp.Engine) -> None:
    segs = mix()
    report = engine.map(stamp, segs, cost=seconds)
    assert report.success_rate == 1.0
    assert [o.index for o in report] == list(range(len(segs)))
    assert [v[2] for v in report.values] == [s.n for s in segs]  # results in input order
    order = start_order(report, segs)
    if engine.capabilities.processes:  # several workers: compare what each one started
        per_worker: dict[int, list[float]] = {}
        for _, pid, n in sorted(report.values):
            per_worker.setdefault(pid, []).append(segs[n].seconds)
        for lengths in per_worker.values():  # each took its chunks in dispatch order
            assert lengths == sorted(lengths, reverse=True)
        first_short = min(t for t, _, n in report.values if segs[n].seconds not in LONG)
        assert all(t <= first_short for t, _, n in report.values if segs[n].seconds == max(LONG))
    else:  # one at a time: exactly longest-first, ties in input order
        assert order == sorted((s.seconds for s in segs), reverse=True)


def test_without_cost_the_input_order_is_kept(serial_engine: sp.Engine) -> None:
    segs = mix()
    order = start_order(serial_engine.map(stamp, segs), segs)
    assert order == [s.seconds for s in segs]


def test_imap_reorders_within_its_lookahead_block_only(serial_engine: sp.Engine) -> None:
    segs = mix()
    got = list(serial_engine.imap(stamp, iter(segs), cost=seconds, lookahead=8))
    assert [o.index for o in got] == list(range(len(segs)))  # ordered: input order
    blocks = [sorted((s.seconds for s in segs[i:i + 8]), reverse=True)
              for i in range(0, len(segs), 8)]
    order = [segs[n].seconds for _, _, n in sorted(o.value for o in got)]  # type: ignore[misc]
    assert order == [x for block in blocks for x in block]


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_with_cost_gives_every_item_once(engine: sp.Engine, ordered: bool) -> None:
    segs = mix() * 3
    segs = [Segment(n, s.seconds) for n, s in enumerate(segs)]
    got = list(engine.imap(stamp, iter(segs), cost=seconds, ordered=ordered, lookahead=5))
    indices = [o.index for o in got]
    assert sorted(indices) == list(range(len(segs)))
    if ordered:
        assert indices == list(range(len(segs)))
    assert all(o.value is not None and o.value[2] == o.index for o in got)


def test_a_failing_source_finishes_what_it_gave(serial_engine: sp.Engine) -> None:
    def source():  # type: ignore[no-untyped-def]
        yield from mix()[:11]
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk") as info:
        serial_engine.map(stamp, source(), cost=seconds)
    report = info.value.report  # type: ignore[attr-defined]
    assert len(report) == 11 and report.success_rate == 1.0


# ---- bad costs ---------------------------------------------------------------------------------


def bad_cost(seg: Segment) -> object:
    # 13: an int beyond float range (a sample count gone wrong) is not finite either
    bad = {3: -1.0, 5: math.nan, 7: "long", 9: True, 11: math.inf, 13: 10**400}
    return bad.get(seg.n, seg.seconds)


def test_a_bad_cost_fails_its_item_alone_naming_cost(engine: sp.Engine) -> None:
    segs = mix()
    report = engine.map(stamp, segs, cost=bad_cost)
    failed = {o.index: o for o in report.failed}
    assert set(failed) == {3, 5, 7, 9, 11, 13}
    for index, outcome in failed.items():
        assert outcome.kind == "error" and outcome.attempts == 0
        assert f"cost(item {index})" in str(outcome.error)
    assert isinstance(failed[7].error, TypeError) and isinstance(failed[3].error, ValueError)
    assert isinstance(failed[13].error, ValueError)
    assert len(report.successful) == len(segs) - 6


def test_a_cost_that_raises_is_named_as_the_cause(engine: sp.Engine) -> None:
    def cost(seg: Segment) -> float:
        if seg.n == 4:
            raise KeyError("seconds")
        return seg.seconds

    report = engine.map(stamp, mix(), cost=cost)
    (bad,) = report.failed
    assert bad.index == 4 and "cost(item 4) raised KeyError" in str(bad.error)
    assert isinstance(bad.error.__cause__, KeyError)


@pytest.mark.needs("hard_timeouts")
def test_a_timeout_scaled_by_cost_names_the_input_index(engine: sp.Engine) -> None:
    segs = mix()

    def timeout(seg: Segment) -> float:
        return -1.0 if seg.n == 41 else 5 + 2 * seg.seconds  # 41: the second long segment

    report = engine.map(stamp, segs, cost=seconds, timeout=timeout)
    (bad,) = report.failed
    assert bad.index == 41 and "timeout(item 41)" in str(bad.error)


@pytest.mark.needs("survives_crash")
def test_a_crash_in_a_reordered_batch_names_the_input_index(engine: sp.Engine) -> None:
    report = engine.map(exit_on_41, mix(), cost=seconds)  # 41 runs second (50 s of media)
    (bad,) = report.failed
    assert bad.index == 41 and bad.kind == "crash" and "item 41" in str(bad.error)
    assert [v for v in report.values] == [n for n in range(44) if n != 41]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"cost": 3}, TypeError, "cost must be a callable"),
    ({"size": "seconds"}, TypeError, "size must be a callable"),
    ({"cost": seconds, "unit": "ms"}, ValueError, "unit must be one of"),
    ({"unit": "s"}, ValueError, "needs cost= or size="),
])
def test_bad_cost_options_are_refused_at_the_door(serial_engine: sp.Engine, kwargs: dict[str, object],
                                                  error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        serial_engine.map(stamp, mix(), **kwargs)  # type: ignore[arg-type]


def test_lookahead_is_validated(serial_engine: sp.Engine) -> None:
    with pytest.raises(ValueError, match="lookahead"):
        serial_engine.imap(stamp, mix(), cost=seconds, lookahead=0)
    # Without cost= nothing is reordered: refused by name, as unit= without cost= or size= is.
    for needs_cost in ({}, {"size": seconds}):
        with pytest.raises(ValueError, match="lookahead=8 needs cost="):
            serial_engine.imap(stamp, mix(), lookahead=8, **needs_cost)


# ---- chunks cut by cost --------------------------------------------------------------------------


def sizer(costs: list[float], workers: int = 2) -> tuple[CostSizer, Arrangement]:
    hints = cost_hints(cost=float, size=None, unit=None, lookahead=None, stream=False)
    assert hints is not None
    arrangement = Arrangement(hints, costs, len(costs), workers)
    next(arrangement)  # the batch has taken its first (longest) item
    s = CostSizer(None, workers, arrangement, target=0.02)
    s.observe_payload(1, 100)
    return s, arrangement


def test_chunks_are_cut_by_cost_not_count() -> None:
    costs = [1.0] * 200 + [20.0, 10.0, 5.0, 5.0]
    s, arrangement = sizer(costs)
    assert arrangement.index[:4] == [200, 201, 202, 203]  # longest first
    s.observe(1, 0.0199, start=0)  # the 20 took 19.9 ms: about 20 units per 20 ms chunk
    assert s.next_size(1) == 3  # 10 + 5 + 5
    assert s.next_size(4) == 20  # twenty items of 1
    assert s.next_size(200) == 1  # the tail: 4 units left, a share of 0.5 each


def test_a_long_item_travels_alone_and_the_tail_shrinks() -> None:
    costs = [1.0] * 100 + [500.0]
    s, arrangement = sizer(costs)
    assert arrangement.index[0] == 100  # the long one went first, alone
    s.observe(1, 0.5, start=0)  # 1 ms per unit: the target allows 20 units
    assert s.next_size(1) == 12  # but what is left (100) is shared 4 x 2 ways: 12.5 units
    assert s.next_size(90) == 1  # 11 left: 1.4 units per share


def test_items_of_cost_zero_are_still_shared_out() -> None:
    s, _ = sizer([0.0] * 100)
    assert 1 <= s.next_size(1) <= 13  # a 1 / (4 x 2) share of what is left, as for equal costs


# ---- progress in seconds of media --------------------------------------------------------------------


def test_progress_counts_seconds_of_media(engine: sp.Engine) -> None:
    seen: list[sp.Progress] = []
    segs = mix()
    engine.map(stamp, segs, cost=seconds, unit="s", on_progress=seen.append)
    total = sum(s.seconds for s in segs)
    last = seen[-1]
    assert last.unit == "s" and last.amount_total == total and last.amount_done == total
    assert last.done == len(segs) and last.eta == 0.0
    assert last.realtime_factor is not None and last.realtime_factor > 0
    assert all(a.amount_done <= b.amount_done for a, b in itertools.pairwise(seen))  # type: ignore[operator]


def test_size_alone_measures_without_reordering(serial_engine: sp.Engine) -> None:
    seen: list[sp.Progress] = []
    segs = mix()
    report = serial_engine.map(stamp, segs, size=seconds, on_progress=seen.append)
    assert start_order(report, segs) == [s.seconds for s in segs]
    assert seen[-1].unit == "s" and seen[-1].amount_done == sum(s.seconds for s in segs)


def lpt_schedule(costs: list[float], workers: int) -> list[tuple[float, float]]:
    """(finish time, cost) of each item when run longest-first on ``workers`` (1 s per unit)."""
    free = [0.0] * workers
    done = []
    for cost in sorted(costs, reverse=True):
        start = heapq.heappop(free)
        heapq.heappush(free, start + cost)
        done.append((start + cost, cost))
    return sorted(done)


def test_cost_weighted_eta_is_within_10_percent_after_a_fifth_of_the_work() -> None:
    """A fake clock: 400 heavy-tailed segments (Pareto, 2 to 60 s) run longest-first by 2
    workers, read when 20% of their media is done. Weighted by cost the ETA is within 10%; by
    item count it is several times too long (the long items go first, so few items are done)."""
    rng = random.Random(14)
    costs = [round(min(60.0, 2 * rng.paretovariate(1.5)), 1) for _ in range(400)]
    finished = lpt_schedule(costs, workers=2)
    makespan, total = finished[-1][0], sum(costs)
    done_cost = done_items = 0.0
    clock = 0.0
    for clock, cost in finished:  # noqa: B007  (the clock when a fifth is done)
        done_cost += cost
        done_items += 1
        if done_cost >= 0.2 * total:
            break
    left = makespan - clock
    eta = estimate_eta(done_cost, total, clock)
    assert eta is not None and abs(eta - left) <= 0.1 * left
    by_items = estimate_eta(done_items, len(costs), clock)
    assert by_items is not None and by_items > 3 * left


def test_eta_is_unknown_before_anything_is_done() -> None:
    assert estimate_eta(0, 10, 5.0) is None and estimate_eta(3, None, 5.0) is None
    assert estimate_eta(5, 10, 0.0) is None and estimate_eta(10, 10, 3.0) == 0.0


def test_the_bar_shows_media_seconds(capsys: pytest.CaptureFixture[str],
                                     serial_engine: sp.Engine) -> None:
    serial_engine.map(stamp, mix(), cost=seconds, unit="s", progress=True, desc="segments")
    err = capsys.readouterr().err
    assert "260.0/260.0 s of media done (44 items), 0 failed" in err and "x realtime" in err


# ---- the async calls ---------------------------------------------------------------------------------


async def _agen(segs: list[Segment]):  # type: ignore[no-untyped-def]
    for seg in segs:
        yield seg


@pytest.mark.asyncio
async def test_map_async_runs_longest_first(serial_engine: sp.Engine) -> None:
    segs = mix()
    report = await asyncio.wait_for(serial_engine.map_async(stamp, segs, cost=seconds), 60)
    assert [v[2] for v in report.values] == [s.n for s in segs]
    assert start_order(report, segs) == sorted((s.seconds for s in segs), reverse=True)


@pytest.mark.asyncio
async def test_imap_async_with_cost_gives_every_item_once(engine: sp.Engine) -> None:
    segs = mix()

    async def collect() -> list[int]:
        return [o.index async for o in engine.imap_async(stamp, _agen(segs), cost=seconds,
                                                         lookahead=6, ordered=True)]

    assert await asyncio.wait_for(collect(), 60) == list(range(len(segs)))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Meter:
    def __init__(self) -> None:
        self.done = 0.0

    def reading(self) -> Reading:
        return Reading("s", self.done, 600.0, self.done, 600.0)


def test_the_terminal_bar_counts_media_seconds() -> None:
    out, meter = _Terminal(), _Meter()
    sink = make_sink(progress=True, on_progress=None, total=300, desc="segments", file=out,
                     meter=meter)
    assert sink is not None
    for done in (30, 150, 300):
        meter.done = 2.0 * done
        sink.update(done, 0)
    sink.close()
    text = out.getvalue()
    assert "600.0/600.0" in text and "x realtime" in text and "s/s" in text
