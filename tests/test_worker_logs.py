"""What a worker says and leaves behind (issue 18, points 5 and 6): its stderr logged line by line
with its pid and item, short crash messages with the whole dump on the exception, and a hung
item's stack and real running time on its timeout."""

from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import _tasks
import stagepool as sp
from stagepool import _dumps

WAIT = 60.0


def noisy(x: int) -> int:
    # Printed early, then the item goes on: the parent reads the line while it still runs.
    print(f"[h264 @ 0x55] decoding segment {x}: corrupt macroblock", file=sys.stderr, flush=True)
    time.sleep(0.3)
    return x


def last_words_then_exit(x: int) -> int:
    os.write(2, b"partial line without newline")
    os._exit(5)


def _until_read() -> None:
    """Wait (bounded) until the parent has read what this worker wrote to stderr, so that it
    reads it while the item still runs, however loaded the machine."""
    import fcntl
    import struct
    import termios

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # FIONREAD: bytes in the pipe the parent has not read
        if not struct.unpack("i", fcntl.ioctl(2, termios.FIONREAD, b"\0" * 4))[0]:
            return
        time.sleep(0.01)


def progress_without_newline(x: int) -> int:
    """A counter written without a newline; the item ends once the parent has read it."""
    os.write(2, f"progress of item {x}".encode())
    _until_read()
    return x


def says_its_item(x: int) -> int:
    os.write(2, f"segment {x} has a corrupt frame\n".encode())
    _until_read()
    return x


def segfault_with_numpy(x: int) -> int:
    import ctypes

    import numpy  # noqa: F401  (an extension module: faulthandler lists it after the dump)

    ctypes.string_at(0)
    return x


def sleep_then_exit(x: int) -> int:
    time.sleep(0.4)
    os._exit(3)


def stuck_in_decode(x: int) -> int:
    while True:
        time.sleep(0.01)


def worker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "stagepool.worker"]


@pytest.fixture(scope="module")
def eng() -> sp.Engine:
    with sp.Engine(workers=2) as engine:
        yield engine


# ---- point 5: logs a team can read -----------------------------------------------------------------


def test_each_stderr_line_is_logged_with_its_worker_and_item(
        eng: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    report = eng.map(noisy, range(4), chunk_size=2, timeout=WAIT)
    assert report.ok, report.failed
    records = [r for r in worker_records(caplog) if "corrupt macroblock" in r.getMessage()]
    assert len(records) == 4
    by_item = {r.item: r for r in records}  # type: ignore[attr-defined]
    assert sorted(by_item) == [0, 1, 2, 3]
    for item, record in by_item.items():
        assert f"decoding segment {item}:" in record.getMessage()
        assert record.worker == report[item].worker  # type: ignore[attr-defined]
        assert record.getMessage().startswith(f"worker {record.worker}, item {item}: ")  # type: ignore[attr-defined]


def test_a_last_line_without_newline_is_not_lost_when_the_worker_dies(
        eng: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    report = eng.map(last_words_then_exit, [7], timeout=WAIT)
    assert report[0].kind == "crash"
    lines = [r for r in worker_records(caplog) if "partial line without newline" in r.getMessage()]
    assert [r.item for r in lines] == [0]  # type: ignore[attr-defined]
    assert "partial line without newline" in str(report[0].error)


def test_records_name_the_input_index_in_a_longest_first_batch(
        eng: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    # cost= runs items in another order than the input's: records said item None.
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    report = eng.map(says_its_item, range(6), cost=lambda x: x, chunk_size=2, timeout=WAIT)
    assert report.values == list(range(6)), report.failed
    logged = {r.getMessage().split(": ", 1)[1]: r.item  # type: ignore[attr-defined]
              for r in worker_records(caplog) if "corrupt frame" in r.getMessage()}
    assert logged == {f"segment {x} has a corrupt frame": x for x in range(6)}


def test_a_line_without_newline_is_ended_at_the_item_boundary_with_its_item(
        caplog: pytest.LogCaptureFixture) -> None:
    # It was glued to the next item's output and logged with the next item.
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    with sp.Engine(workers=1) as one:
        report = one.map(progress_without_newline, range(3), chunk_size=1, timeout=WAIT)
        assert report.ok, report.failed
    logged = [(r.item, r.getMessage().split(": ", 1)[1])  # type: ignore[attr-defined]
              for r in worker_records(caplog) if "progress of" in r.getMessage()]
    assert logged == [(x, f"progress of item {x}") for x in range(3)]


def test_a_segfault_message_is_short_and_the_full_dump_is_on_the_exception(
        eng: sp.Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    report = eng.map(segfault_with_numpy, [0], timeout=WAIT)
    error = report[0].error
    assert isinstance(error, sp.WorkerCrashed)
    message = str(error)
    assert "SIGSEGV" in message and "item 0" in message
    assert "Fatal Python error: Segmentation fault" in message and "in segfault_with_numpy" in message
    assert "Extension modules" not in message and len(message) < 1500
    assert "Extension modules" in error.stderr and "numpy" in error.stderr
    assert "Extension modules" not in report.summary()
    assert "in segfault_with_numpy" in (report[0].traceback or "")  # the dump, as the outcome's traceback
    logged = "\n".join(r.getMessage() for r in worker_records(caplog))
    assert "Fatal Python error: Segmentation fault" in logged  # the dump reached the logs too
    assert eng.map(_tasks.double, [1, 2], timeout=WAIT).values == [2, 4]  # still serving


def test_failure_details_survive_pickling() -> None:
    crashed = pickle.loads(pickle.dumps(sp.WorkerCrashed("died", stderr="the dump")))
    hung = pickle.loads(pickle.dumps(sp.TaskTimeout("hung", stack="the stack")))
    assert (str(crashed), crashed.stderr) == ("died", "the dump")
    assert (str(hung), hung.stack) == ("hung", "the stack")


# ---- point 6: a hung item leaves a clue --------------------------------------------------------------


def test_a_timed_out_item_says_where_it_hung_and_how_long_it_ran(eng: sp.Engine) -> None:
    report = eng.map(stuck_in_decode, [0], timeout=1.0)
    outcome = report[0]
    assert outcome.kind == "timeout"
    error = outcome.error
    assert isinstance(error, sp.TaskTimeout)
    assert "stuck in stuck_in_decode (" in str(error) and "test_worker_logs.py:" in str(error)
    assert "stuck_in_decode" in error.stack and "(most recent call first)" in error.stack
    assert outcome.traceback == error.stack
    assert 0.9 <= outcome.duration < 30  # it ran about its timeout, not 0.00
    assert eng.map(_tasks.double, [3], timeout=WAIT).values == [6]


def test_an_item_hung_in_c_is_dumped_and_stays_a_timeout(eng: sp.Engine) -> None:
    # libc pause() returns when the stack signal arrives: the item must not then answer "ok".
    report = eng.map(_tasks.hang_in_c, [0, 1], timeout=1.0, chunk_size=1)
    assert [o.kind for o in report] == ["timeout", "ok"]
    assert "in hang_in_c (" in str(report[0].error)


def test_a_crashed_item_reports_how_long_it_ran(eng: sp.Engine) -> None:
    report = eng.map(sleep_then_exit, [0], timeout=WAIT)
    assert report[0].kind == "crash"
    assert 0.35 <= report[0].duration < 30
    assert "(after 0." in str(report[0].error)


# ---- the dump parser, on edge texts (pure) ----------------------------------------------------------


DUMP = """noise before
Thread 0x00007f0c662e86c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 982 in run
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f0c67049b80 (most recent call first):
  File "/app/stage.py", line 40 in resample
  File "/app/stage.py", line 12 in process
after"""


def test_last_dump_takes_every_thread_and_where_names_the_main_threads_frame() -> None:
    dump = _dumps.last_dump(DUMP)
    assert dump.startswith("Thread 0x00007f0c662e86c0") and dump.endswith("line 12 in process")
    assert _dumps.where(dump) == "resample (/app/stage.py:40)"


def test_dump_parser_edge_cases() -> None:
    assert _dumps.last_dump("") == "" and _dumps.where("") == ""
    assert _dumps.last_dump("just a warning\n") == ""
    no_frames = "Current thread 0x01 (most recent call first):\n  <no Python frame>\n"
    assert _dumps.where(_dumps.last_dump(no_frames)) == ""
    fatal = ("Fatal Python error: Segmentation fault\n\n" + DUMP.split("\n", 1)[1]
             + "\n\nExtension modules: " + "x, " * 2000 + "(total: 2000)\n")
    short = _dumps.brief(fatal)
    assert short.splitlines()[0] == "Fatal Python error: Segmentation fault"
    assert "Extension modules" not in short and len(short) < 1000
    assert _dumps.brief("a" * 5000).endswith("...") and len(_dumps.brief("a" * 5000)) <= 200


SCRIPT = """
import sys
import stagepool as sp

def warn(x):
    print(f"[aac @ 0x1] segment {x}: invalid band", file=sys.stderr, flush=True)
    import time; time.sleep(0.3)
    return x

if __name__ == "__main__":
    with sp.Engine(workers=1) as engine:
        assert engine.map(warn, [0, 1], chunk_size=1).ok
"""


def test_without_logging_configured_the_lines_still_reach_stderr_prefixed(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "invalid band" in line]
    assert len(lines) == 2
    assert re.fullmatch(r"worker \d+, item 0: \[aac @ 0x1\] segment 0: invalid band", lines[0])
    assert re.fullmatch(r"worker \d+, item 1: \[aac @ 0x1\] segment 1: invalid band", lines[1])


@pytest.mark.needs("hard_timeouts")
def test_every_backend_that_stops_hung_items_says_where_and_how_long(engine: sp.Engine) -> None:
    report = engine.map(_tasks.hang_loop, [0, 1], timeout=1.5, chunk_size=1)
    assert [o.kind for o in report] == ["timeout", "ok"]
    assert "stuck in hang_loop (" in str(report[0].error)
    assert "hang_loop" in (report[0].traceback or "")
    assert report[0].duration >= 1.3


def warn_then_fail(x: int) -> int:
    if x == 0:  # a decoder that worked a while on the segment, then gives up
        time.sleep(0.005)
        os.write(2, b"segment 0: corrupt frame, giving up\n")
        raise ValueError("segment 0 is damaged")
    time.sleep(0.5)
    return x


def test_a_failed_items_last_words_are_logged_with_it_while_the_parent_is_busy(
        caplog: pytest.LogCaptureFixture) -> None:
    """What an item wrote to stderr just before it raised is logged with that item even when
    the parent reads the pipe late (here its main thread computes, holding the GIL in switch
    intervals): the worker waits for the read before the next item. It was logged with the
    next item, which then ran for half a second. (An item that fails within a millisecond is
    not waited for: see _worker_stderr.READ_AFTER.)"""
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    reports: list[sp.BatchReport[int]] = []
    with sp.Engine(workers=1) as eng:
        eng.map(abs, [1])  # started and warm
        thread = threading.Thread(
            target=lambda: reports.append(eng.map(warn_then_fail, [0, 1], chunk_size=2)))
        thread.start()
        deadline = time.monotonic() + WAIT
        while thread.is_alive() and time.monotonic() < deadline:
            sum(range(10_000))  # C code holding the GIL: the pool thread waits its turn
        thread.join(WAIT)
    assert [o.kind for o in reports[0]] == ["error", "ok"]
    lines = [r for r in caplog.records if "corrupt frame" in r.getMessage()]
    assert [r.item for r in lines] == [0]  # type: ignore[attr-defined]

