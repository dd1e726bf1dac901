"""Lifecycle on real processes: Ctrl-C, a SIGKILLed caller, engines left open, nested engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import stagepool as sp
from conftest import WAIT, shm_entries, wait_until

SRC = str(Path(sp.__file__).resolve().parent.parent)


class Script:
    """A Python script in a subprocess whose stdout goes to a file we can poll (reading a pipe
    line by line and then calling communicate() loses what the line reader had buffered)."""

    def __init__(self, body: str, tmp: Path) -> None:
        code = f"import sys\nsys.path.insert(0, {SRC!r})\n" + textwrap.dedent(body)
        tmp.mkdir(parents=True, exist_ok=True)
        self.out_path = tmp / "stdout.txt"
        self._out = self.out_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self._out,
                                     stderr=subprocess.PIPE, text=True)

    def output(self) -> str:
        return self.out_path.read_text()

    def pids(self) -> list[int]:
        assert wait_until(lambda: "\n" in self.output()), self.finish()[1]
        line = self.output().splitlines()[0]
        assert line.startswith("PIDS"), line
        return [int(p) for p in line.split()[1:]]

    def finish(self, kill: bool = False) -> tuple[str, str]:
        if kill:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=WAIT)
        self._out.close()
        return self.output(), err


@pytest.fixture
def script(tmp_path: Path) -> Iterator[Callable[[str], Script]]:
    """Start scripts; whatever happens in the test, none outlives it (nor its workers)."""
    started: list[Script] = []

    def start(body: str) -> Script:
        started.append(Script(body, tmp_path / str(len(started))))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            for child in psutil.Process(s.proc.pid).children(recursive=True):
                child.kill()
            s.finish(kill=True)


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_ctrl_c_during_map_returns_fast_and_leaves_no_worker(script: Callable[[str], Script]) -> None:
    # "Fast" against this machine's pace now, measured here: the script's own start (an
    # interpreter, the import, an engine of 2 workers). Not waiting for the running items (an
    # hour each) is what is checked; an absolute 5 s failed on a loaded machine.
    started = time.monotonic()
    proc = script("""
        import signal, time, stagepool as sp
        # A shell's background job starts with SIGINT ignored; a terminal's Ctrl-C would not be.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with sp.Engine(workers=2, chunk_size=1) as eng:
            print("PIDS", *eng.worker_pids(), flush=True)
            try:
                eng.map(time.sleep, [3600] * 10)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
    """)
    pids = proc.pids()
    pace = time.monotonic() - started
    time.sleep(1.5)  # the batch is running
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGINT)
    out, err = proc.finish()
    assert "INTERRUPTED" in out, err
    took = time.monotonic() - started
    assert took < max(5.0, 2 * pace), (took, pace)
    assert wait_until(lambda: not alive(pids), timeout=10)


def test_workers_exit_when_the_caller_is_sigkilled(script: Callable[[str], Script]) -> None:
    proc = script("""
        import time, stagepool as sp
        eng = sp.Engine(workers=2)
        print("PIDS", *eng.worker_pids(), flush=True)
        eng.map(time.sleep, [60, 60])
    """)
    pids = proc.pids()
    time.sleep(1.0)
    proc.finish(kill=True)
    assert wait_until(lambda: not alive(pids), timeout=10), alive(pids)


def test_engine_left_open_at_exit_does_not_hang(script: Callable[[str], Script]) -> None:
    proc = script("""
        import time, stagepool as sp
        eng = sp.Engine(workers=2)
        print("PIDS", *eng.worker_pids(), flush=True)
        eng.submit(time.sleep, 1000)
        print(eng.map(abs, [-1, -2]).values, flush=True)
    """)
    pids = proc.pids()
    out, err = proc.finish()
    assert proc.proc.returncode == 0, err
    assert "[1, 2]" in out
    assert wait_until(lambda: not alive(pids), timeout=10)


def test_engine_garbage_collected_does_not_hang(script: Callable[[str], Script]) -> None:
    proc = script("""
        import gc, stagepool as sp
        def make():
            eng = sp.Engine(workers=1)
            return eng.worker_pids()
        print("PIDS", *make(), flush=True)
        gc.collect()
        print("DONE", flush=True)
    """)
    pids = proc.pids()
    out, err = proc.finish()
    assert proc.proc.returncode == 0 and "DONE" in out, err
    assert wait_until(lambda: not alive(pids), timeout=10)


def _nested(x: int) -> list[int]:
    import stagepool as inner_sp

    with inner_sp.Engine(workers=1) as inner:
        return inner.map(abs, [-x, x]).values


def test_an_engine_inside_a_task_works(engine: sp.Engine) -> None:
    report = engine.map(_nested, [3])
    assert report[0].ok, report[0].error
    assert report.values == [[3, 3]]


def test_submit_from_many_threads_is_safe(engine: sp.Engine) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda i: engine.submit(abs, -i), range(300)))
    assert [f.result(timeout=WAIT) for f in futures] == list(range(300))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")
def test_nothing_of_ours_in_dev_shm_after_a_crash() -> None:
    # Only this process's entries: other test runs on the machine create their own meanwhile.
    before = shm_entries()
    with sp.Engine(workers=2) as eng:
        eng.map(os._exit, [3])  # type: ignore[arg-type]
    assert not shm_entries() - before


# ---- leaving ``with Engine()`` while an item hangs (issue 17.6) ---------------------------------

HUNG_IN_BLOCK = """
    import signal, time, stagepool as sp
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C
    try:
        with sp.Engine(workers=1) as eng:
            print("PIDS", *eng.worker_pids(), flush=True)
            future = eng.submit(time.sleep, 1000)
            {body}
    except KeyboardInterrupt:
        print("INTERRUPTED", type(future.exception(timeout=5)).__name__, flush=True)
"""


@pytest.mark.parametrize("where", ["in the block", "waiting in __exit__"])
def test_ctrl_c_in_with_engine_stops_a_hung_item(script: Callable[[str], Script],
                                                 where: str) -> None:
    body = "time.sleep(1000)" if where == "in the block" else 'print("EXITING", flush=True)'
    proc = script(HUNG_IN_BLOCK.format(body=body))
    pids = proc.pids()
    time.sleep(1.0)  # the item is running, and the script is where it should be
    proc.proc.send_signal(signal.SIGINT)
    out, err = proc.finish()  # bounded: WAIT, where it used to wait for the item forever
    assert "INTERRUPTED TaskCancelled" in out, err
    assert wait_until(lambda: not alive(pids), timeout=10), alive(pids)


def test_an_exception_leaving_with_engine_stops_a_hung_item() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the caller failed"), sp.Engine(workers=1) as eng:
        pids = eng.worker_pids()
        future = eng.submit(time.sleep, 1000)
        assert wait_until(future.running, timeout=WAIT)
        raise RuntimeError("the caller failed")
    assert time.monotonic() - started < WAIT  # a bound, not a speed test: the item hangs 1000 s
    assert isinstance(future.exception(timeout=WAIT), sp.TaskCancelled)
    assert wait_until(lambda: not alive(pids), timeout=10), alive(pids)


def test_an_exception_leaving_async_with_engine_stops_a_hung_item() -> None:
    import asyncio

    async def main() -> tuple[list[int], sp.BatchReport[None]]:
        with pytest.raises(RuntimeError, match="the caller failed"):
            async with sp.Engine(workers=1) as eng:
                pids = eng.worker_pids()
                task = asyncio.create_task(eng.map_async(time.sleep, [1000]))
                await asyncio.sleep(1.0)
                raise RuntimeError("the caller failed")
        return pids, await task

    pids, report = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert [o.kind for o in report] == ["cancelled"]
    assert wait_until(lambda: not alive(pids), timeout=10), alive(pids)


TESTS = str(Path(__file__).resolve().parent)


def test_a_killed_caller_leaves_no_grandchild(script: Callable[[str], Script], tmp_path: Path) -> None:
    # One sleeper is the item's child, the other an orphan in its worker's process group.
    pid_files = [tmp_path / "direct.pid", tmp_path / "orphan.pid"]
    proc = script(f"""
        sys.path.insert(0, {TESTS!r})
        import stagepool as sp, _tasks
        eng = sp.Engine(workers=2)
        print("PIDS", *eng.worker_pids(), flush=True)
        eng.map(_tasks.start_sleeper, [("direct", "hang", {str(pid_files[0])!r}),
                                       ("orphan", "hang", {str(pid_files[1])!r})], chunk_size=1)
    """)
    workers = proc.pids()
    try:
        assert wait_until(lambda: all(f.exists() and f.read_text() for f in pid_files)), proc.finish()
        sleepers = [int(f.read_text()) for f in pid_files]
        proc.finish(kill=True)
        assert wait_until(lambda: not alive(workers + sleepers), timeout=10), alive(workers + sleepers)
    finally:
        for pid in alive([int(f.read_text()) for f in pid_files if f.exists() and f.read_text()]):
            psutil.Process(pid).kill()


def test_a_crashed_items_child_does_not_hold_the_callers_stdout(tmp_path: Path) -> None:
    # `python job.py | cat`: the reader ends when every holder of the pipe has closed it.
    pid_file = tmp_path / "sleep.pid"
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{SRC!r}, {TESTS!r}]
        import stagepool as sp, _tasks
        with sp.Engine(workers=1) as eng:
            print(eng.map(_tasks.start_sleeper, [("direct", "crash", {str(pid_file)!r})])[0].kind)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=WAIT)
        assert out.strip() == "crash"
    finally:  # the sleeper first: while it holds the pipe, reading it never ends
        if pid_file.exists():
            for pid in alive([int(pid_file.read_text())]):
                psutil.Process(pid).kill()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT)


def test_an_engine_inherited_by_a_fork_refuses_to_work_there(script: Callable[[str], Script]) -> None:
    proc = script("""
        import os, stagepool as sp
        eng = sp.Engine(workers=1)
        print("PIDS", *eng.worker_pids(), flush=True)
        assert eng.map(abs, [-1]).values == [1]
        pid = os.fork()
        if pid == 0:
            for call in (lambda: eng.map(abs, [-2]), lambda: list(eng.imap(abs, [-2])),
                         lambda: eng.submit(abs, -2)):
                try:
                    call()
                except sp.EngineClosed as exc:
                    print("CHILD", exc, flush=True)
            sys.exit(0)  # a normal exit: atexit hooks run
        _, status = os.waitpid(pid, 0)
        print("CHILD EXIT", os.waitstatus_to_exitcode(status), flush=True)
        print("PARENT", eng.map(abs, [-3]).values, flush=True)
        eng.shutdown()
    """)
    workers = proc.pids()
    out, err = proc.finish()
    assert proc.proc.returncode == 0, err
    refusals = [line for line in out.splitlines() if line.startswith("CHILD this Engine")]
    assert len(refusals) == 3, out
    assert f"created in process {proc.proc.pid}" in refusals[0] and "create a new Engine" in refusals[0]
    assert "CHILD EXIT 0" in out and "PARENT [3]" in out
    assert "can only join a child process" not in err and "Traceback" not in err, err
    assert wait_until(lambda: not alive(workers), timeout=10)


def test_an_engine_in_a_deleted_working_directory_is_refused_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script run from a temporary directory that is then deleted (issue 15 attack): every
    worker start failed deep inside the process launch, the pool thread died with a loky
    traceback and every item came back cancelled. ``Engine()`` now says why, and starts nothing."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError, match=r"working directory .*deleted.*os\.chdir"):
        sp.Engine(workers=1)
    monkeypatch.chdir(tmp_path)
    with sp.Engine(workers=1) as eng:  # from an existing directory all is well
        assert eng.map(abs, [-1]).values == [1]
