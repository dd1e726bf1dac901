"""Item keys (issue 18.4) and resumable batches (issue 14), on real worker processes.

A checkpointed batch killed with SIGKILL at random moments (hypothesis), then resumed: every
item exactly once, values as in a clean run, nothing run again beyond what was in flight."""

from __future__ import annotations

import asyncio
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import stagepool as sp
from _resume_tasks import Item, item_key, items, marked, other, runs
from _tasks import double, fail_on
from conftest import WAIT, wait_until

N = 12
TASKS = Path(__file__).parent / "_resume_tasks.py"
SRC = Path(sp.__file__).parent.parent


def expected(i: int) -> Any:
    return np.full(300_000, i, dtype=np.float64) if i % 7 == 0 else i * i


def assert_clean_values(report: sp.BatchReport[Any], n: int) -> None:
    assert [o.index for o in report] == list(range(n))
    for outcome in report:
        if outcome.index == 5:
            assert outcome.kind == "error" and "item 5 is bad" in str(outcome.error)
        else:
            assert outcome.ok and np.array_equal(outcome.value, expected(outcome.index))


@pytest.fixture
def markers(tmp_path: Path) -> str:
    path = tmp_path / "markers"
    path.mkdir()
    return str(path)


# ---- keys on outcomes, aligned values ------------------------------------------------------------


def test_outcomes_carry_the_key_and_values_line_up_with_the_inputs(engine: sp.Engine) -> None:
    data = [(i, i % 3 == 1) for i in range(8)]
    report = engine.map(fail_on, data, key=lambda item: f"seg-{item[0]}")
    assert report.keys == [f"seg-{i}" for i in range(8)]
    assert [o.key for o in report] == report.keys
    assert [o.key for o in report.failed] == ["seg-1", "seg-4", "seg-7"]
    assert report.values_or(None) == [None if i % 3 == 1 else i * 3 for i in range(8)]
    assert report.values_or(fill=-1)[1] == -1 and report.values == [0, 6, 9, 15, 18]
    for ordered in (True, False):
        streamed = {o.index: o.key for o in engine.imap(fail_on, iter(data), ordered=ordered,
                                                        key=lambda item: item[0] * 10)}
        assert streamed == {i: i * 10 for i in range(8)}


def test_without_a_key_outcomes_say_none(engine: sp.Engine) -> None:
    report = engine.map(double, range(3))
    assert report.keys == [None] * 3 and all(o.key is None for o in report)
    assert report.values_or(0) == report.values == [0, 2, 4]
    assert next(iter(engine.imap(double, [1]))).key is None


def test_a_bad_key_is_named_before_any_item_runs(engine: sp.Engine, markers: str,
                                                 tmp_path: Path) -> None:
    data = items(N, markers, 0.0)
    cases: list[tuple[Any, type[Exception], str, dict[str, Any]]] = [
        (lambda item: 1 / (item[0] - 3), ValueError,
         "key= raised for item 3: ZeroDivisionError", {}),
        (lambda item: [item[0]], TypeError, "key= returned an unhashable value for item 0", {}),
        (lambda item: item[0] // 2, ValueError,
         "key= returned 0 for item 1 and for item 0: keys must be unique",
         {"checkpoint": tmp_path / "a"}),
        (lambda item: (lambda: item) if item[0] == 2 else item[0], TypeError,
         "for item 2, which cannot be pickled", {"checkpoint": tmp_path / "b"}),
    ]
    for key, error, message, options in cases:
        with pytest.raises(error, match=message):
            engine.map(marked, data, key=key, **options)
    assert runs(markers) == {}


def test_a_key_that_would_never_match_on_a_rerun_is_refused(engine: sp.Engine, markers: str,
                                                            tmp_path: Path) -> None:
    """A NaN inside a key differs from itself once read back from the journal: every rerun
    recomputed everything (and grew the journal) while looking like a resume."""
    with pytest.raises(ValueError, match=r"for item 0, .*not equal to itself.*NaN"):
        engine.map(marked, items(N, markers, 0.0), checkpoint=tmp_path,
                   key=lambda item: ("seg", item[0], float("nan")))
    assert runs(markers) == {}


def _key_of_tags(item: tuple[int, ...]) -> Any:
    return {[item[0]]: 1}  # the callable's own TypeError ("unhashable type: 'list'")


def _key_from_a_name(item: tuple[int, ...]) -> Any:
    try:
        return int(f"segment-{item[0]}")
    except ValueError as exc:
        raise LookupError(f"no id in item {item[0]}") from exc


def test_a_key_callable_that_raises_is_reported_as_raising_with_its_cause(
        engine: sp.Engine, markers: str, tmp_path: Path) -> None:
    # It was reported as "returned an unhashable value ... keys must be hashable".
    data = items(N, markers, 0.0)
    for key, message in [(_key_of_tags, "key= raised for item 0: TypeError: unhashable type"),
                         (_key_from_a_name, "key= raised for item 0: LookupError: no id in "
                          "item 0 [(]caused by ValueError: invalid literal")]:
        with pytest.raises(ValueError, match=message) as info:
            engine.map(marked, data, key=key, checkpoint=tmp_path / key.__name__)
        assert "hashable (str" not in str(info.value) and info.value.__cause__ is not None
    assert runs(markers) == {}


def test_a_bad_key_in_a_stream_ends_it_as_a_failing_source_would(engine: sp.Engine) -> None:
    with pytest.raises(ValueError, match="key= raised for item 4") as info:
        engine.map(double, iter(range(10)), key=lambda x: 1 // (x - 4))
    partial = info.value.report  # type: ignore[attr-defined]
    assert [o.value for o in partial] == [0, 2, 4, 6]
    assert partial.keys == [1 // (x - 4) for x in range(4)]


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [item_key, None], ids=["key", "index+content"])
def test_a_rerun_skips_what_the_checkpoint_finished(engine: sp.Engine, markers: str,
                                                    tmp_path: Path, key: Any) -> None:
    checkpoint = tmp_path / "ckpt"
    first = engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint, key=key)
    assert_clean_values(first, N)
    assert runs(markers) == dict.fromkeys(range(N), 1)

    again = engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint, key=key)
    assert_clean_values(again, N)
    assert runs(markers) == {**dict.fromkeys(range(N), 1), 5: 2}  # only the error ran again
    assert again.stats.restored == N - 1 and "11 restored from the checkpoint" in again.summary()
    assert again.keys == [key(item) if key else None for item in items(N, markers, 0.0)]
    assert all(o.attempts == 1 and o.worker is not None for o in again)
    assert again[7].value.flags.writeable  # a restored array is the caller's own


def test_a_damaged_side_file_runs_its_item_again(local_engine: sp.Engine, markers: str,
                                                tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Side files deleted or cut short (a cleanup script, a full disk) raised FileNotFoundError
    or numpy's ValueError from inside the journal: the whole checkpoint was unusable. Such an
    item now runs again, with a warning naming the file; the rest is restored."""
    checkpoint = tmp_path / "ckpt"
    local_engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key)
    gone, cut = sorted((checkpoint / "side").iterdir())  # items 0 and 7's arrays
    gone.unlink()
    with open(cut, "r+b") as f:
        f.truncate(100)
    again = local_engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key)
    assert_clean_values(again, N)
    assert runs(markers) == {**dict.fromkeys(range(N), 1), 0: 2, 5: 2, 7: 2}
    assert again.stats.restored == N - 3
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert gone.name in warned and cut.name in warned and "runs again" in warned


def test_errors_count_as_finished_when_asked(engine: sp.Engine, markers: str,
                                             tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    for _ in range(2):
        report = engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint,
                            finished_kinds=("ok", "error"))
        assert_clean_values(report, N)
    assert runs(markers) == dict.fromkeys(range(N), 1)
    assert report.stats.restored == N and report[5].traceback  # the worker's traceback too


def test_changed_content_runs_again_under_default_keys(engine: sp.Engine, markers: str,
                                                       tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint)
    changed = items(N, markers, 0.0)
    changed[3] = (3, markers, 0.001)  # same index, other content
    engine.map(marked, changed, checkpoint=checkpoint)
    assert runs(markers)[3] == 2 and runs(markers)[4] == 1


def test_a_journal_of_another_function_is_refused_unless_asked(engine: sp.Engine, markers: str,
                                                               tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key)
    with pytest.raises(sp.CheckpointError, match=r"written for function '_resume_tasks\.marked"):
        engine.map(other, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key)
    with pytest.raises(sp.CheckpointError, match="written for keys"):
        engine.map(marked, items(N, markers, 0.0), checkpoint=checkpoint)
    assert runs(markers) == dict.fromkeys(range(N), 1)  # refused before anything ran
    reused = engine.map(other, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key,
                        checkpoint_mismatch="reuse")
    assert reused.stats.restored == N - 1
    restarted = engine.map(other, items(N, markers, 0.0), checkpoint=checkpoint, key=item_key,
                           checkpoint_mismatch="restart")
    assert restarted.stats.restored == 0 and runs(markers)[0] == 2


def test_checkpoint_options_are_checked_at_the_call(engine: sp.Engine, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(sp.CheckpointError, match="is not a writable directory"):
        engine.map(double, [1], checkpoint=blocker / "ckpt")
    with pytest.raises(sp.CheckpointError, match="is not a writable directory"):
        engine.imap(double, [1], checkpoint=blocker / "ckpt")  # at the call, not the first next
    with pytest.raises(ValueError, match="finished_kinds must include 'ok'"):
        engine.map(double, [1], checkpoint=tmp_path / "c", finished_kinds=("error",))
    with pytest.raises(ValueError, match="need checkpoint="):
        engine.map(double, [1], finished_kinds=("ok", "error"))
    with pytest.raises(ValueError, match="checkpoint_mismatch must be one of"):
        engine.map(double, [1], checkpoint=tmp_path / "c", checkpoint_mismatch="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a callable"):
        engine.map(double, [1], key="name")  # type: ignore[arg-type]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_stream_resumes_with_the_restored_outcomes_in_their_places(
        engine: sp.Engine, markers: str, tmp_path: Path, ordered: bool) -> None:
    checkpoint = tmp_path / "ckpt"
    first = engine.imap(marked, iter(items(N, markers, 0.0)), checkpoint=checkpoint,
                        key=item_key, ordered=ordered)
    for outcome in first:
        if outcome.index == 6:
            break  # stopped early: what finished so far is journaled
    first.close()  # type: ignore[attr-defined]
    seen = [o for o in engine.imap(marked, iter(items(N, markers, 0.0)), checkpoint=checkpoint,
                                   key=item_key, ordered=ordered)]
    indices = [o.index for o in seen]
    assert (indices if ordered else sorted(indices)) == list(range(N))
    assert [o.key for o in sorted(seen)] == [f"segment-{i}" for i in range(N)]
    assert all(count <= 2 for count in runs(markers).values())


@pytest.mark.needs("processes")
def test_map_async_resumes_too(engine: sp.Engine, markers: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"

    async def run() -> sp.BatchReport[Any]:
        return await engine.map_async(marked, items(N, markers, 0.0), checkpoint=checkpoint,
                                      key=item_key)

    asyncio.run(asyncio.wait_for(run(), WAIT))
    report = asyncio.run(asyncio.wait_for(run(), WAIT))
    assert_clean_values(report, N)
    assert report.stats.restored == N - 1 and report.keys[0] == "segment-0"


# ---- kill -9 at random moments, then resume ----------------------------------------------------

KILL_N = 30
KILL_ITEM_SECONDS = 0.05
# The child runs chunks of one item, at most 2 in flight; results absorbed and not yet
# journaled add at most as many again: what a kill may cost is bounded by twice the window.
IN_FLIGHT = 2 * 2


def _start_child(checkpoint: Path, markers: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TASKS.parent)])}
    child = subprocess.Popen([sys.executable, str(TASKS), str(checkpoint), markers, str(KILL_N),
                              str(KILL_ITEM_SECONDS)], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], WAIT)
    assert ready and child.stdout.readline() == b"started\n"
    return child


def _kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child; its workers notice and exit, freeing its shared memory."""
    workers = psutil.Process(child.pid).children(recursive=True)
    child.kill()
    child.wait(timeout=WAIT)
    assert child.stdout is not None
    child.stdout.close()
    _, alive = psutil.wait_procs(workers, timeout=WAIT)
    assert not alive, f"workers outlived their killed parent: {alive}"
    assert wait_until(lambda: not [name for name in os.listdir("/dev/shm")
                                   if name.startswith(f"stagepool-{child.pid}-")])


def _tear(journal: Path) -> None:
    """A record whose write was cut short: its frame says 500 bytes, 7 follow."""
    if journal.exists():
        with open(journal, "ab") as f:
            f.write(struct.pack("<II", 500, 0) + b"partial")


# No shrinking: each example starts and kills a process; the failing one is printed as found.
@pytest.mark.timeout(300)
@settings(max_examples=int(os.environ.get("KILL_EXAMPLES", 6)), deadline=None,
          phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(delay=st.floats(min_value=0.0, max_value=1.0), tear=st.booleans())
def test_kill_9_at_any_moment_then_resume(local_engine: sp.Engine,
                                          tmp_path_factory: pytest.TempPathFactory,
                                          delay: float, tear: bool) -> None:
    base = tmp_path_factory.mktemp("kill")
    checkpoint, markers = base / "ckpt", base / "markers"
    markers.mkdir()
    child = _start_child(checkpoint, str(markers))
    try:
        time.sleep(delay)
    finally:
        _kill(child)
    if tear:
        _tear(checkpoint / "journal.spj")
    before = runs(str(markers))

    data: list[Item] = items(KILL_N, str(markers), KILL_ITEM_SECONDS)
    report = local_engine.map(marked, data, checkpoint=checkpoint, key=item_key)

    assert_clean_values(report, KILL_N)  # every item once, values as in a clean run
    assert report.keys == [item_key(item) for item in data]
    after = runs(str(markers))
    assert set(after) == set(range(KILL_N))
    again = [i for i in before if after[i] > before[i] and i != 5]  # 5 fails: never finished
    assert len(again) <= IN_FLIGHT, f"ran again beyond those in flight: {again}"
    assert report.stats.restored == len(before) - (5 in before) - len(again)
