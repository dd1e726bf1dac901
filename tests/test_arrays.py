"""Big numpy arrays through shared memory, on real workers: same results as pickling, clear
read-only/writable semantics, and nothing of ours left in /dev/shm whatever happens."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _array_tasks as at
import stagepool as sp
from conftest import WAIT, wait_until
from test_faults import CRASH_TABLE, GUILTY
from test_lifecycle import alive

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
MiB = 2**20


def ours() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"stagepool-{os.getpid()}-")}


@pytest.fixture(scope="module")
def shm_engine() -> Iterator[sp.Engine]:
    with sp.Engine(workers=2, shm_threshold="1MiB", timeout=3) as eng:
        yield eng


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal(300_000).astype(np.float32),  # 1.1 MiB: shared memory
        rng.standard_normal((600, 400)).T,  # Fortran order, 1.8 MiB
        rng.integers(0, 255, (25, 108, 192, 3), dtype=np.uint8)[:, ::2],  # non-contiguous video
        np.arange(10, dtype=np.int64),  # small: pickled
        np.zeros((0, 5)),  # zero-size
        np.array(3.5),  # 0-d
        np.array([("a", 1.0)] * 100_000, dtype=[("name", "U4"), ("x", "f8")]),  # structured
    ]


def test_results_match_the_pickle_path(shm_engine: sp.Engine) -> None:
    with sp.Engine(workers=1, shm_threshold=0) as plain:
        expected = plain.map(at.double, arrays()[:3] + arrays()[3:6]).values
    got = shm_engine.map(at.double, arrays()[:3] + arrays()[3:6]).values
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    structured = shm_engine.map(at.is_writeable, [arrays()[6]])
    assert structured.ok
    assert not ours()


def test_nested_containers_and_object_arrays(shm_engine: sp.Engine) -> None:
    item = {"frames": np.ones((512, 1024), np.float32), "meta": "seg-3", "pair": (1, 2)}
    [out] = shm_engine.map(at.scale_nested, [item]).values
    assert np.array_equal(out["frames"], item["frames"] * 2) and out["pair"] == (2, 3)
    objects = np.array([{"a": i} for i in range(200_000)], dtype=object)  # falls back to pickle
    assert shm_engine.map(len, [objects]).values == [200_000]


def test_inputs_are_read_only_unless_asked(shm_engine: sp.Engine) -> None:
    big = np.zeros(MiB, dtype=np.float32)
    report = shm_engine.map(at.write_in_place, [big])
    assert report[0].kind == "error" and isinstance(report[0].error, ValueError)
    assert "read-only" in str(report[0].error)
    with sp.Engine(workers=1, writable_inputs=True) as eng:
        assert eng.map(at.write_in_place, [big]).values == [42.0]
    assert big[0] == 0  # the caller's array is never touched


@pytest.mark.parametrize(("fn", "numpy_says"), [
    (at.write_in_place, "assignment destination is read-only"),
    (at.scale_in_place, "output array is read-only"),
])
def test_writing_a_shared_input_says_how_to_get_a_writable_one(shm_engine: sp.Engine, fn: Any,
                                                               numpy_says: str) -> None:
    report = shm_engine.map(fn, [np.ones(MiB, np.float32), np.ones(16, np.float32)], chunk_size=2)
    error = report[0].error
    assert isinstance(error, ValueError) and numpy_says in str(error)
    notes = getattr(error, "__notes__", [])
    assert any("writable_inputs=True" in note and "copy()" in note for note in notes), notes
    # A small input is read-only too (18.2): the same failure, the same advice.
    assert report[1].kind == "error" and numpy_says in str(report[1].error)
    assert any("writable_inputs=True" in n for n in getattr(report[1].error, "__notes__", []))
    # Without shared-memory inputs a read-only error is the function's own business: no note.
    [other] = shm_engine.map(at.write_frozen_buffer, [8]).failed
    assert "read-only" in str(other.error) and not getattr(other.error, "__notes__", [])


def test_results_are_ordinary_writable_arrays(shm_engine: sp.Engine) -> None:
    [out] = shm_engine.map(at.make_big, [MiB]).values
    out[0] = 1  # the caller owns it: its segment is unlinked, nobody else maps it
    assert out[0] == 1 and out[1] == 7 and out.flags.writeable
    assert not ours()  # unlinked as soon as mapped: the array keeps the memory


@pytest.mark.parametrize("fn", [at.big_then_crash, at.big_then_hang])
def test_no_segment_survives_a_crash_or_timeout(shm_engine: sp.Engine, fn) -> None:  # type: ignore[no-untyped-def]
    items = [np.full(MiB, v, dtype=np.float32) for v in (1, -1, 2, 3)]
    report = shm_engine.map(fn, items, chunk_size=2)
    assert [o.kind for o in report] == ["ok", "crash" if fn is at.big_then_crash else "timeout",
                                        "ok", "ok"]
    assert wait_until(lambda: not ours(), timeout=5), ours()


def test_no_segment_survives_an_abandoned_stream(shm_engine: sp.Engine) -> None:
    def endless() -> Iterator[np.ndarray]:
        while True:
            yield np.ones(MiB, dtype=np.float32)

    stream = shm_engine.imap(at.double, endless())
    for _ in range(5):
        next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert wait_until(lambda: not ours(), timeout=10), ours()


def test_results_unmap_as_soon_as_the_caller_drops_them(shm_engine: sp.Engine) -> None:
    # Without the garbage collector: a reference cycle would keep every result mapped (the
    # parent's RSS then grows with the batch, not with the in-flight window).
    gc.disable()
    try:
        refs = []
        for outcome in shm_engine.imap(at.double, (np.full(MiB, i, np.float32) for i in range(12))):
            arr = outcome.value
            assert float(arr[0]) == 2.0 * outcome.index
            base = arr
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            refs.append(weakref.ref(base))
            del arr, base, outcome
        assert [r() for r in refs] == [None] * 12
    finally:
        gc.enable()


def test_recycled_segments_do_not_outlive_the_batch(shm_engine: sp.Engine) -> None:
    items = [np.full(MiB, i, dtype=np.float32) for i in range(24)]
    report = shm_engine.map(at.double, items, chunk_size=1)
    assert [float(v[0]) for v in report.values] == [2.0 * i for i in range(24)]
    assert not ours()  # the batch's recycled input segments went with it


def test_only_sizes_asked_for_again_are_kept_for_reuse() -> None:
    """A batch keeps answered input segments to reuse their pages, but arrays of uneven sizes
    are never reused: kept up to the arena's bound, they held 211 MiB of /dev/shm for nothing.
    Only a size the batch asked for at least twice is kept now."""
    from stagepool import _recycling, _shm, _transport

    arena = id(object())
    _shm.open_arena(arena)

    def blob(n: int) -> bytes:
        return _transport.dumps(np.zeros(n), threshold=1, owner=os.getpid(), creator="p",
                                arena=arena)

    try:
        for i in range(4):  # each size once: none kept
            _shm.recycle(blob(MiB // 8 + 64 * (i + 1)), arena)
        assert _recycling.kept_bytes(arena) == 0
        same = [blob(MiB // 8) for _ in range(3)]  # one size, three times: kept
        names = {n for b in same for n in _shm.segment_names(b)}
        for b in same:
            _shm.recycle(b, arena)
        assert _recycling.kept_bytes(arena) == 3 * MiB
        again = blob(MiB // 8)
        assert set(_shm.segment_names(again)) <= names  # reused
        _shm.discard(again)
    finally:
        _shm.close_arena(arena)
    assert not ours()


def test_an_input_the_function_keeps_is_never_overwritten() -> None:
    with sp.Engine(workers=1, chunk_size=1) as eng:
        kept = eng.map(at.keep_first_input, [np.full(MiB, i, np.float32) for i in range(8)]).values
    assert kept == [0.0] * 8  # the first input, read again after later inputs arrived


def test_no_segment_survives_kill_shutdown() -> None:
    eng = sp.Engine(workers=2, chunk_size=1)
    futures = [eng.submit(at.big_then_hang, np.full(MiB, -1, dtype=np.float32)) for _ in range(3)]
    time.sleep(0.5)
    eng.shutdown(kill=True)
    assert all(f.done() for f in futures)
    assert wait_until(lambda: not ours(), timeout=10), ours()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_no_segment_survives_a_killed_or_interrupted_parent(tmp_path: Path, sig: int) -> None:
    src = str(Path(sp.__file__).resolve().parent.parent)
    tests = str(Path(__file__).parent)
    script = textwrap.dedent(f"""
        import sys, os, signal
        sys.path[:0] = [{src!r}, {tests!r}]
        import numpy as np, stagepool as sp, _array_tasks as at
        # A shell's background job starts with SIGINT ignored; a terminal's Ctrl-C would not be.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with sp.Engine(workers=2, chunk_size=1) as eng:
            eng.map(abs, [1, 2])  # the workers are up (a parent killed mid-spawn is another
            # story: then the next engine's start sweeps what it left)
            # results of the first two in segments, inputs of the hanging ones mapped in workers
            items = [np.full(2**20, v, dtype=np.float32) for v in (1, 2, -1, -1, 3, 4)]
            print(os.getpid(), flush=True)
            try:
                eng.map(at.big_then_hang, items)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
    """)
    out = (tmp_path / "out").open("w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: (tmp_path / "out").read_text().strip() != "", timeout=WAIT)
    child = int((tmp_path / "out").read_text().split()[0])
    mine = lambda: {n for n in os.listdir("/dev/shm") if n.startswith(f"stagepool-{child}-")}  # noqa: E731
    assert wait_until(lambda: bool(mine()), timeout=WAIT)  # inputs are in shared memory
    time.sleep(0.3)  # the first results are back, the hanging items are running
    proc.send_signal(sig)
    proc.wait(WAIT)
    out.close()
    if sig == signal.SIGINT:
        assert "INTERRUPTED" in (tmp_path / "out").read_text() and proc.returncode == 0
    # SIGKILL: the orphaned workers clean up; Ctrl-C: the engine's shutdown does
    assert wait_until(lambda: not mine(), timeout=10), mine()


@pytest.mark.parametrize("busy", [True, False], ids=["answering", "idle"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_caller_killed_while_streaming_leaves_nothing(tmp_path: Path, sig: int, busy: bool) -> None:
    # 16 MB arrays through imap, both ways. When the caller dies, inputs and results are in
    # /dev/shm, and the workers either finish an item just then (busy: the first news is EPIPE
    # on sending the answer) or wait for the next chunk while the caller dawdles over an outcome
    # (idle: the first news is EOF). Either way they must free it all, then exit.
    src = str(Path(sp.__file__).resolve().parent.parent)
    tests = str(Path(__file__).parent)
    script = textwrap.dedent(f"""
        import sys, os, itertools, time
        sys.path[:0] = [{src!r}, {tests!r}]
        import numpy as np, stagepool as sp, _array_tasks as at
        with sp.Engine(workers=2) as eng:
            arrays = (np.full(4 * 2**20, i, np.float32) for i in itertools.count())
            for outcome in eng.imap(at.double_after_the_caller_dies if {busy} else at.double,
                                   arrays):
                if outcome.index == 5:
                    print(os.getpid(), *eng.worker_pids(), flush=True)
                    if not {busy}:
                        time.sleep(10**6)
    """)
    out_path = tmp_path / "out"
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: out_path.read_text().strip() != "", timeout=WAIT)
        caller, *workers = (int(p) for p in out_path.read_text().split())
        mine = lambda: {n for n in os.listdir("/dev/shm") if n.startswith(f"stagepool-{caller}-")}  # noqa: E731
        time.sleep(0.3)
        assert mine()  # the test is worth something only if there is something to free
        proc.send_signal(sig)
        proc.wait(WAIT)
        assert wait_until(lambda: not mine(), timeout=10), mine()
        assert wait_until(lambda: not alive(workers), timeout=10), alive(workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_big_arrays_travel_one_per_chunk(shm_engine: sp.Engine) -> None:
    # 8 MiB each: a chunk of several would make one worker hold them all before the next starts.
    report = shm_engine.map(at.double, [np.full(2 * MiB, i, np.float32) for i in range(6)])
    assert [float(v[0]) for v in report.values] == [2.0 * i for i in range(6)]
    assert report.stats.chunks == 6


def _rss_mib(kinds: tuple[str, ...] = ("RssAnon", "RssShmem")) -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in kinds) // 1024


def test_streaming_2_gib_keeps_the_parents_memory_to_the_window(shm_engine: sp.Engine) -> None:
    # 256 x 8 MiB in and as many out, produced and consumed one at a time: the parent's memory
    # may hold the in-flight window (2 chunks per worker + 1, one array each) and what is being
    # encoded and read, never a growing share of the 4 GiB that pass through.
    def segments() -> Iterator[np.ndarray]:
        for i in range(256):
            yield np.full(2 * MiB, i, np.float32)

    gc.collect()
    base = peak = _rss_mib()
    anon_base = anon_peak = _rss_mib(("RssAnon",))
    seen = 0
    for outcome in shm_engine.imap(at.double, segments()):
        assert outcome.ok and float(outcome.value[-1]) == 2.0 * outcome.index
        seen += 1
        del outcome
        peak = max(peak, _rss_mib())
        anon_peak = max(anon_peak, _rss_mib(("RssAnon",)))
    assert seen == 256
    window = (2 * shm_engine.workers + 1) * 8
    assert peak - base <= 2 * window + 32, f"parent grew {peak - base} MiB (window {window} MiB)"
    # The inputs live in shared memory only: the parent's own heap holds the segment being made
    # and what the allocator keeps (glibc trims above 16 MiB), not the window's inputs.
    assert anon_peak - anon_base <= 3 * 8, f"parent heap grew {anon_peak - anon_base} MiB"
    assert not ours()


# ---- every entry point, retries included ------------------------------------------------------


def test_submit_and_retries_move_arrays_both_ways(tmp_path: Path) -> None:
    with sp.Engine(workers=2, shm_threshold="1MiB", retries=1, retry_on=("crash",), backoff=0) as eng:
        fut = eng.submit(at.double, np.full(MiB, 3, np.float32))
        assert float(fut.result(timeout=WAIT)[0]) == 6.0
        # Item 1 kills its worker on its first run (with its input segment mapped), then succeeds.
        items = [(np.full(MiB, i, np.float32), str(tmp_path / f"m{i if i == 1 else 'x'}"))
                 for i in range(4)]
        (tmp_path / "mx").touch()  # the others never crash
        report = eng.map(at.crash_once_then_double, items, chunk_size=1)
        assert report.ok, report.failed
        assert [float(v[0]) for v in report.values] == [0.0, 2.0, 4.0, 6.0]
        assert [o.attempts for o in report] == [1, 2, 1, 1]
    assert wait_until(lambda: not ours(), timeout=10), ours()


def test_a_retry_carries_the_input_the_worker_kept_and_unlinked(tmp_path: Path) -> None:
    # The batch keeps only views of its inputs' segments; the worker kept these inputs, so it
    # unlinked their segments, and the parent recycles nothing that it may send again.
    items = [(np.full(MiB, i + 1, np.float32), str(tmp_path / f"m{i}")) for i in range(4)]
    with sp.Engine(workers=1, shm_threshold="1MiB", retries=1, retry_on="error", backoff=0) as eng:
        report = eng.map(at.keep_and_fail_once, items, chunk_size=2)
    assert report.ok, report.failed
    assert report.values == [float(MiB * (i + 1)) for i in range(4)]
    assert [o.attempts for o in report] == [2, 2, 2, 2]
    assert wait_until(lambda: not ours(), timeout=10), ours()


@pytest.mark.asyncio
async def test_the_async_calls_move_arrays_both_ways(shm_engine: sp.Engine) -> None:
    items = [np.full(MiB, i, np.float32) for i in range(5)]
    report = await asyncio.wait_for(shm_engine.map_async(at.double, items), WAIT)
    assert [float(v[-1]) for v in report.values] == [2.0 * i for i in range(5)]
    streamed = [o async for o in shm_engine.imap_async(at.double, items)]  # completion order
    assert sorted((o.index, float(o.value[0])) for o in streamed) == [(i, 2.0 * i) for i in range(5)]
    one = await asyncio.wait_for(shm_engine.submit_async(at.double, items[4]), WAIT)
    assert one.shape == (MiB,) and float(one[0]) == 8.0
    del report, streamed, one
    assert wait_until(lambda: not ours(), timeout=10), ours()


# ---- the fault table, with arrays in flight ----------------------------------------------------


@pytest.fixture(scope="module")
def fault_shm_engine() -> Iterator[sp.Engine]:
    with sp.Engine(workers=2, shm_threshold="1MiB", timeout=2.0, chunk_size=3) as eng:
        yield eng


@pytest.mark.parametrize(("fn", "kind"), [(row[0], row[1]) for row in CRASH_TABLE],
                         ids=[row[0].__name__ for row in CRASH_TABLE])
def test_no_segment_survives_any_fault_of_the_table(fault_shm_engine: sp.Engine, fn, kind: str) -> None:  # type: ignore[no-untyped-def]
    # Inputs mapped by the dying worker, results of its chunk's earlier items already in segments.
    items = [(fn, 0 if i == GUILTY else i + 1, np.full(MiB, i, np.float32)) for i in range(8)]
    report = fault_shm_engine.map(at.fault_with_arrays, items)
    assert [o.kind for o in report] == [kind if i == GUILTY else "ok" for i in range(8)]
    for o in report:
        if o.ok:
            assert float(o.value[0][0]) == 2.0 * o.index and o.value[1] == o.index + 1
    del report
    assert wait_until(lambda: not ours(), timeout=10), ours()


def test_no_segment_survives_a_worker_dying_while_it_sends(fault_shm_engine: sp.Engine) -> None:
    items = [np.full(MiB, -1.0 if i == 2 else i, np.float32) for i in range(5)]
    report = fault_shm_engine.map(at.die_while_sending, items)
    assert [o.kind for o in report] == ["ok", "ok", "crash", "ok", "ok"]
    assert "exited with code 7" in str(report[2].error)
    del report
    assert wait_until(lambda: not ours(), timeout=10), ours()


# ---- property: any mix of sizes, chunkings and failures ---------------------------------------


@pytest.fixture(scope="module")
def small_shm_engine() -> Iterator[sp.Engine]:
    with sp.Engine(workers=2, shm_threshold="64KiB") as eng:  # small arrays keep this fast
        yield eng


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.sampled_from([0, 10, 15_000, 16_384, 70_000]), max_size=40),
       failing=st.sets(st.integers(0, 39)),
       chunk_size=st.one_of(st.just("auto"), st.integers(1, 8)),
       mode=st.sampled_from(["map", "imap", "imap-unordered"]))
def test_any_mix_gives_one_outcome_per_item_equal_to_pickling(
        small_shm_engine: sp.Engine, sizes: list[int], failing: set[int], chunk_size: int | str,
        mode: str) -> None:
    # float32 sizes around the 64 KiB threshold (16,384 elements), below it, zero-size
    items = [np.full(n, -1.0 - i if i in failing else float(i), np.float32) for i, n in enumerate(sizes)]
    if mode == "map":
        outcomes = list(small_shm_engine.map(at.double_or_raise, items, chunk_size=chunk_size))
    else:
        outcomes = list(small_shm_engine.imap(at.double_or_raise, iter(items), chunk_size=chunk_size,
                                              ordered=mode == "imap"))
    assert sorted(o.index for o in outcomes) == list(range(len(items)))
    if mode != "imap-unordered":
        assert [o.index for o in outcomes] == list(range(len(items)))
    for o in outcomes:
        item = items[o.index]
        if o.index in failing and item.size:
            assert o.kind == "error" and f"negative segment {float(item[0])}" in str(o.error)
        else:
            assert o.ok, o
            assert o.value.dtype == item.dtype and np.array_equal(o.value, item * 2)
            assert o.value.flags.writeable
    del outcomes
    assert not ours()


def test_an_argument_whose_finalizer_ends_the_worker_is_blamed_not_the_chunks_last() -> None:
    """A worker lets go of a chunk's shared-memory inputs before answering: an argument whose
    finalizer ends the worker then fails its own item, and the others come back ok. Before,
    the record still named the chunk's last item as running, and that one read crash."""
    items = [(np.full(2 * MiB // 8, float(i)),
              at.DiesWhenFreedElsewhere(os.getpid()) if i == 1 else None) for i in range(6)]
    with sp.Engine(workers=2, shm_threshold="1MiB") as engine:
        report = engine.map(at.first_of, items, chunk_size=3)
        assert [o.kind for o in report] == ["ok", "crash", "ok", "ok", "ok", "ok"]
        assert [o.value for o in report if o.ok] == [0.0, 2.0, 3.0, 4.0, 5.0]
        assert engine.map(at.first_of, [(np.zeros(4), None)]).values == [0.0]
    assert not ours()


@pytest.mark.timeout(60)
def test_an_argument_whose_finalizer_hangs_times_out_alone() -> None:
    """Letting go of shared-memory inputs before answering is timed like pickling the answer:
    the argument whose finalizer hangs fails its own item with timeout (the chunk is halved to
    find it), the others come back ok. Before, the chunk waited for ever, whatever the timeout
    (or, until the previous commit, the chunk's last item read timeout)."""
    items = [(np.full(2 * MiB // 8, float(i)),
              at.HangsWhenFreedElsewhere(os.getpid()) if i == 1 else None) for i in range(6)]
    with sp.Engine(workers=2, shm_threshold="1MiB") as engine:
        report = engine.map(at.first_of, items, chunk_size=3, timeout=2)
        assert [o.kind for o in report] == ["ok", "timeout", "ok", "ok", "ok", "ok"]
        assert [o.value for o in report if o.ok] == [0.0, 2.0, 3.0, 4.0, 5.0]
        assert engine.map(at.first_of, [(np.zeros(4), None)]).values == [0.0]
    assert not ours()
