"""Memory-pressure backpressure (issue 14): dispatch pauses above memory_high and resumes below
memory_low; running items finish; the report counts the pauses."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import stagepool as sp
from _cost_tasks import Segment, hold_memory, stamp
from conftest import WAIT
from stagepool import _pressure
from stagepool._cgroups import CgroupLimits, read_cgroup
from stagepool._pressure import (
    MemoryUse,
    MemoryWatch,
    PressureGate,
    Watermarks,
    check_watermarks,
    memory_use,
    next_paused,
)
from stagepool._resources import read_memory

GiB = 1 << 30


@pytest.mark.parametrize(("high", "low", "expected"), [
    (0.8, None, Watermarks(0.8, 0.7)),
    (0.9, 0.5, Watermarks(0.9, 0.5)),
    (1, None, Watermarks(1.0, 0.9)),
    (0.05, None, Watermarks(0.05, 0.025)),  # high - 0.1 would be a mark never reached: half
    (0.1, None, Watermarks(0.1, 0.05)),
    (None, None, None),
])
def test_watermarks(high: Any, low: Any, expected: Watermarks | None) -> None:
    assert check_watermarks(high, low) == expected


def test_numpy_fractions_are_fractions() -> None:
    """A fraction computed with numpy (np.float32(0.8)) was refused as "not a fraction", while
    numpy numbers were fine as seconds for timeout= and cost=."""
    np = pytest.importorskip("numpy")
    marks = check_watermarks(np.float32(0.75), np.float64(0.5))
    assert marks == Watermarks(0.75, 0.5) and type(marks.high) is float


@pytest.mark.parametrize(("high", "low", "error", "match"), [
    (0.7, 0.8, ValueError, r"memory_low \(0.8\) must be below memory_high \(0.7\)"),
    (0.8, 0.8, ValueError, "must be below"),
    (1.5, None, ValueError, r"memory_high must be in \(0, 1\]"),
    (0.0, None, ValueError, "memory_high must be in"),
    (float("nan"), None, ValueError, "memory_high must be in"),
    ("80%", None, TypeError, "memory_high must be a fraction"),
    (True, None, TypeError, "memory_high must be a fraction"),
    (0.8, -0.1, ValueError, "memory_low must be in"),
    (None, 0.5, ValueError, "memory_low needs memory_high"),
])
def test_bad_watermarks_are_refused_by_the_engine(high: Any, low: Any, error: type[Exception],
                                                  match: str) -> None:
    with pytest.raises(error, match=match):
        sp.Engine(backend="serial", memory_high=high, memory_low=low)


def test_the_fuller_of_cgroup_and_machine_counts_and_cache_is_not_pressure() -> None:
    machine = (16 * GiB, 12 * GiB)  # 25% used
    tight = CgroupLimits(2, None, mem_limit=2 * GiB, mem_usage=GiB, mem_reclaimable=GiB // 2)
    assert memory_use(tight, *machine) == MemoryUse(GiB // 2, 2 * GiB, "cgroup")  # 25% after cache
    full = CgroupLimits(2, None, mem_limit=2 * GiB, mem_usage=2 * GiB - 1)
    assert memory_use(full, *machine).where == "cgroup" and memory_use(full, *machine).fraction > 0.99
    assert memory_use(CgroupLimits(), *machine) == MemoryUse(4 * GiB, 16 * GiB, "machine")


def test_hysteresis() -> None:
    marks = Watermarks(0.8, 0.7)
    assert not next_paused(False, 0.79, marks) and next_paused(False, 0.8, marks)
    assert next_paused(True, 0.75, marks) and not next_paused(True, 0.69, marks)


def fake_cgroup(tmp_path: Path) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/job\n")
    (root / "job").mkdir(parents=True)
    (root / "job" / "memory.max").write_text(str(1000 * 2**20))
    return proc, root


def test_pause_and_resume_driven_by_a_fake_cgroup(tmp_path: Path) -> None:
    """A fake cgroup v2 tree and a fake clock: the gate pauses at 80% of memory.max (cache not
    counted), holds below 80% until under 70%, reads at most every 50 ms, and times its pauses."""
    proc, root = fake_cgroup(tmp_path)
    current, stat = root / "job" / "memory.current", root / "job" / "memory.stat"
    now = [0.0]

    def read() -> MemoryUse:
        return memory_use(read_cgroup(proc, root), 64 * GiB, 60 * GiB)  # the machine: roomy

    gate = PressureGate(MemoryWatch(Watermarks(0.8, 0.7), read, clock=lambda: now[0], every=0.05))
    steps = [  # (memory.current MiB, inactive_file MiB, allowed)
        (500, 0, True), (950, 200, True),  # 75%: the page cache is not pressure
        (850, 0, False), (750, 0, False), (650, 0, True), (820, 0, False), (100, 0, True)]
    for mib, cache, allowed in steps:
        current.write_text(str(mib * 2**20))
        stat.write_text(f"anon 1\ninactive_file {cache * 2**20}\n")
        now[0] += 0.1  # past the read interval: every step is read
        assert gate.allows() is allowed, (mib, cache)
    assert gate.pauses == 2
    assert gate.paused_time() == pytest.approx(0.2 + 0.1)  # 0.3-0.5 s and 0.6-0.7 s


def test_the_gate_reads_at_most_every_interval() -> None:
    reads: list[float] = []
    now = [0.0]

    def read() -> MemoryUse:
        reads.append(now[0])
        return MemoryUse(1, 10, "machine")

    watch = MemoryWatch(Watermarks(0.8, 0.7), read, clock=lambda: now[0], every=0.05)
    gates = [PressureGate(watch) for _ in range(3)]  # three batches of one engine
    for _ in range(100):
        now[0] += 0.001
        assert all(gate.allows() for gate in gates)
    assert len(reads) == 2  # at 1 ms and 51 ms, for all three


def test_nothing_starts_while_memory_is_full(engine: sp.Engine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A scripted memory reading (the pure decision's input): 95% full for the first 0.6 s of
    the batch, then 10%. No item starts before that, every item then runs, the report counts one
    pause of about 0.6 s."""
    if engine.backend == "dask":
        pytest.skip("on a dask cluster its workers pause themselves (dask's worker thresholds)")
    full_until = time.monotonic() + 0.75  # 0.6 s after the sleep below

    def machine_scripted() -> tuple[int, int]:
        used = 95 if time.monotonic() < full_until else 10
        return 100 * GiB, (100 - used) * GiB

    def with_cgroup_scripted() -> tuple[CgroupLimits, int, int]:
        return CgroupLimits(), *machine_scripted()

    monkeypatch.setattr(_pressure, "read_machine_memory", machine_scripted)
    monkeypatch.setattr(_pressure, "read_memory", with_cgroup_scripted)
    time.sleep(0.15)  # the engine's last reading (shared by its batches) is now stale
    segs = [Segment(n, 5.0) for n in range(20)]
    report = engine.map(stamp, segs)
    assert report.success_rate == 1.0
    assert min(t for t, _, _ in report.values) >= full_until - 0.001
    assert report.stats.pauses == 1
    assert 0.5 <= report.stats.paused_time <= 5.0


def test_a_real_allocation_pauses_dispatch_until_it_is_freed() -> None:
    """High-water mark a little above what the machine uses now; one worker allocates 1.5 GiB
    and holds it for 1.5 s while the other items wait; dispatch resumes once it is freed."""
    now = memory_use(*read_memory())
    hog = 1536
    step = hog * 2**20 / now.limit  # the hog's share of the limit
    if now.fraction + step > 0.95:
        pytest.skip(f"the machine has no room for a {hog} MiB allocation")
    high, low = now.fraction + step / 2, now.fraction + step / 4
    with sp.Engine(workers=2, memory_high=high, memory_low=low) as engine:
        items = [hog] + [1] * 150
        report = engine.map(_alloc_or_sleep, items, chunk_size=1)
    assert report.success_rate == 1.0 and report[0].value == hog * 2**20
    assert report.stats.pauses >= 1 and report.stats.paused_time > 0.1


def _alloc_or_sleep(megabytes: int) -> int:
    if megabytes > 1:
        return hold_memory(megabytes)
    time.sleep(0.02)
    return 0


def test_a_mark_already_passed_at_the_start_trickles_and_says_why(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """memory_high below what the machine already uses (another program's memory: nothing this
    batch runs can free it) paused the batch forever. After a pause of LOG_AFTER it is logged
    with the reading, and the batch goes on one chunk at a time while none of it runs."""
    monkeypatch.setattr(_pressure, "LOG_AFTER", 0.5)  # 10 s in production
    high = memory_use(*read_memory()).fraction / 2
    with sp.Engine(workers=2, memory_high=high) as engine:
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.update(
            report=engine.map(stamp, [Segment(n, 5.0) for n in range(12)], chunk_size=1)),
            daemon=True)
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive(), "the batch waited for memory that never comes"
    report = box["report"]
    assert report.success_rate == 1.0 and report.stats.pauses == 1
    starts = sorted((t, t + 0.005) for t, _, _ in report.values)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(starts))  # one at a time
    assert any("one chunk at a time" in r.getMessage() for r in caplog.records)


def test_the_pause_log_shows_a_low_mark_below_one_percent(caplog: pytest.LogCaptureFixture) -> None:
    """memory_high=0.01 resumes below 0.5%: the log said "resumes below 0%"."""
    now = [0.0]
    watch = MemoryWatch(Watermarks(0.01, 0.005), lambda: MemoryUse(4, 100, "machine"),
                        clock=lambda: now[0], every=0.0)
    gate = PressureGate(watch)
    for t in (0.0, _pressure.LOG_AFTER + 1):
        now[0] = t
        gate.allows()
    assert "resumes below 0.5%" in caplog.text
