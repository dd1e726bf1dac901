"""Task functions for the tests: module-level so workers import them by reference."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any


def double(x: int) -> int:
    return x * 2


def identity(x: Any) -> Any:
    return x


def fail_on(x: tuple[int, bool]) -> int:
    value, fail = x
    if fail:
        raise ValueError(f"bad item {value}")
    return value * 3


class StageFailure(Exception):
    """A project's own base class of stage errors (retry_on may name it)."""


class NeedsTwoArgs(StageFailure):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"a={a} b={b}")


def raise_unrebuildable(x: int) -> int:
    raise NeedsTwoArgs(x, x + 1)


class HoldsLock(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable(x: int) -> int:
    raise HoldsLock(f"locked {x}")


def return_lock(x: int) -> Any:
    return threading.Lock() if x == 2 else x


def raise_systemexit(x: int) -> int:
    if x == 1:
        raise SystemExit(7)
    if x == 2:
        raise KeyboardInterrupt
    return x


def _refuse_in_parent() -> Any:
    raise RuntimeError("this object cannot be rebuilt in the parent")


class BreaksInParent:
    """Pickles fine in the worker, fails to unpickle in the parent."""

    def __reduce__(self) -> Any:
        return (_refuse_in_parent, ())


def return_breaks_in_parent(x: int) -> Any:
    return BreaksInParent() if x == 3 else x


def _refuse_in_worker(value: int) -> Any:
    if os.environ.get("STAGEPOOL_TEST_PARENT") != str(os.getpid()):
        raise RuntimeError(f"argument {value} cannot be rebuilt in a worker")
    return BreaksInWorker(value)


class BreaksInWorker:
    """Pickles fine in the parent, fails to unpickle in a worker."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_refuse_in_worker, (self.value,))


class DiesWhenFreed:
    """A result whose finalizer ends the process it was made in (a C library's destructor that
    aborts); its copy in the parent is harmless."""

    def __init__(self, value: int) -> None:
        self.value, self.born = value, os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self.born:
            os._exit(7)


def dies_when_freed(x: int) -> DiesWhenFreed:
    return DiesWhenFreed(x)


class ForksWhenFreed:
    """A result whose finalizer forks in the process it was made in, and whose child carries
    on where the finalizer ran (a C library's destructor that spawns a helper)."""

    def __init__(self, value: int) -> None:
        self.value, self.born = value, os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self.born:
            os.fork()


class HangsWhenFreed:
    """A result whose finalizer hangs in the process it was made in when ``hang`` (a C
    library's destructor that waits on a lock nobody will release)."""

    def __init__(self, value: int, hang: bool) -> None:
        self.value, self.hang, self.born = value, hang, os.getpid()

    def __del__(self) -> None:
        if self.hang and os.getpid() == self.born:
            time.sleep(3600)


def hangs_when_freed(item: tuple[int, bool]) -> HangsWhenFreed:
    return HangsWhenFreed(*item)


class HangsWhenPickled:
    """A result whose pickling hangs (a ``__reduce__`` that waits on a lock nobody releases)."""

    def __reduce__(self) -> Any:
        time.sleep(3600)
        raise AssertionError("unreachable")


def hangs_when_pickled_on(x: int) -> Any:
    return HangsWhenPickled() if x == 1 else x


def forks_when_freed(item: tuple[int, str]) -> ForksWhenFreed:
    """Notes each run in ``path`` (pid and item), then returns a ``ForksWhenFreed``."""
    x, path = item
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return ForksWhenFreed(x)


def pid_of(_: Any) -> int:
    return os.getpid()


def env_of(name: str) -> str | None:
    return os.environ.get(name)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


_INIT_VALUE: list[int] = []


def init_set(value: int) -> None:
    _INIT_VALUE.append(value)


def init_fail() -> None:
    raise RuntimeError("cannot open the model file")


def read_init(_: Any) -> list[int]:
    return list(_INIT_VALUE)


# ---- misbehaving tasks: each fails the item at value == target --------------------------------

def segfault(x: int) -> int:
    if x == 0:
        ctypes.string_at(0)
    return x


def hard_exit(x: int) -> int:
    if x == 0:
        os._exit(3)
    return x


def sigkill_self(x: int) -> int:
    if x == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sigterm_self(x: int) -> int:
    if x == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    return x


def hang_sleep(x: int) -> int:
    if x == 0:
        time.sleep(10**6)
    return x


def hang_loop(x: int) -> int:
    if x == 0:
        while True:
            pass
    return x


def hang_ignoring_sigterm(x: int) -> int:
    if x == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(0.01)
    return x


def hang_in_c(x: int) -> int:
    if x == 0:
        libc = ctypes.CDLL(None)
        libc.pause()  # never returns to the interpreter: only a signal ends it
    return x


def hang_with_child(x: int) -> int:
    if x == 0:
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        with open(os.environ["STAGEPOOL_TEST_CHILD_FILE"], "w") as f:
            f.write(str(child.pid))
        time.sleep(10**6)
    return x


def raise_timeout_error(x: int) -> int:
    if x == 0:
        raise TimeoutError("the task's own timeout")
    return x


def slow_then(x: int) -> int:
    time.sleep(0.02)
    return x


def exit_slowly(pid_file: str) -> int:
    """Returns at once, but its worker will take 10 s to exit (an atexit hook, as a library
    flushing a cache might have); writes the worker's pid to ``pid_file``."""
    import atexit

    atexit.register(time.sleep, 10)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def loaded_modules(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` this process has imported (this module imports nothing heavy itself)."""
    import sys

    return sorted(name for name in names if name in sys.modules)


def touch(path: str) -> str:
    """Leave a file behind: proof that the item ran."""
    with open(path, "w") as f:
        f.write("ran")
    return path


def inf_for_two(x: int) -> float:
    """A per-item timeout that is infinite for item 2."""
    return float("inf") if x == 2 else 30.0


class InterruptsPickling:
    """An argument whose pickling is interrupted, as by a Ctrl-C in the middle of a big chunk."""

    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def logged(arg: tuple[int, str, str]) -> int:
    """Append this run to the item's log, then do what ``action`` says: "ok", "error",
    "crash" (os._exit), "hang" (sleep far past any timeout), "crash_once" (crash on the first
    run only) or "slow" (30 ms). The log counts runs, whatever becomes of the process."""
    index, action, folder = arg
    path = os.path.join(folder, str(index))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        runs = os.fstat(fd).st_size
        os.write(fd, b".")
    finally:
        os.close(fd)
    if action == "crash" or (action == "crash_once" and runs == 0):
        os._exit(3)
    if action == "hang":
        time.sleep(3600)
    if action == "slow":
        time.sleep(0.03)
    if action == "error":
        raise ValueError(f"item {index} failed on purpose")
    return index


# ---- the executor view: references, tracebacks, pickling ----------------------------------------

class Token:
    """A result (or argument) the tests hold only by weak reference."""

    def __init__(self, value: int) -> None:
        self.value = value

    def method(self, x: int) -> int:
        return self.value + x


def make_token(value: int) -> Token:
    return Token(value)


class Parser:
    @classmethod
    def parse(cls, text: str) -> int:
        raise ValueError(f"cannot parse {text!r}")  # the line a traceback must show


class RefusesPickle:
    """Pickling it fails with ``pickle.PicklingError``, as an unpicklable object usually does."""

    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("RefusesPickle cannot be pickled")


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def pid_after_nap(seconds: float) -> int:
    """The worker's pid, at once for 0 (a tiny item: no sleep call), else after ``seconds``."""
    if seconds:
        time.sleep(seconds)
    return os.getpid()


def add(a: int, b: int, c: int = 0) -> int:
    return a + b + c


def kwargs_of(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def return_refuses_pickle(_: Any) -> RefusesPickle:
    return RefusesPickle()


def sleep_then_touch(path: str, seconds: float) -> str:
    time.sleep(seconds)
    return touch(path)


# ---- hostile items: forks, child processes, closed standard fds, crashing initializers ----------

def fork_then_return(x: int) -> int:
    """Forks, and both processes return: only the worker's answer may reach the parent."""
    os.fork()
    return x * 10


_forker: int | None = None  # the worker's pid, once an item forked


def fork_at_then_note(item: tuple[int, int, str]) -> int:
    """Item ``fork_at`` forks (both processes return); a forked child then notes each item it
    runs in ``path`` (the worker notes nothing)."""
    global _forker
    x, fork_at, path = item
    if x == fork_at:
        _forker = os.getpid()
        os.fork()
    if _forker is not None and os.getpid() != _forker:
        with open(path, "a") as f:
            f.write(f"{x}\n")
    return x


def run_chunk_guarded(items: list[Any], per_item_clock: bool) -> list[Any]:
    """``run_chunk`` as a pool worker runs it: with the worker's at-fork hook registered (call
    it in a process of its own: the hook stays)."""
    from stagepool import _worker, _worker_guards

    os.register_at_fork(after_in_child=_worker_guards.mark_forked)
    return _worker.run_chunk(fork_at_then_note, items, per_item_clock=per_item_clock).values


def fork_and_wait(item: tuple[int, str]) -> tuple[int, int]:
    """The forked child ends as ``how`` says ("return", "raise" or "exit"); the item waits for it
    and returns its value with the child's exit code, as a program that forks would check it."""
    x, how = item
    pid = os.fork()
    if pid == 0:
        if how == "raise":
            raise RuntimeError("the child fails")
        if how == "exit":
            sys.exit(x % 7)
        return -x
    _, status = os.waitpid(pid, 0)
    return x * 10, os.waitstatus_to_exitcode(status)


def init_fork() -> None:
    os.fork()  # the child returns from the initializer too


def start_sleeper(item: tuple[str, str, str]) -> int:
    """Starts ``sleep 777`` ("direct": a child; "orphan": through a shell that exits at once, so
    it belongs to no process tree), writes its pid to ``pid_file``, then ends as ``then`` says:
    "crash" (os._exit), "hang", or "return"."""
    how, then, pid_file = item
    if how == "direct":
        pid = subprocess.Popen(["sleep", "777"]).pid
    else:
        pid = int(subprocess.run(["sh", "-c", "sleep 777 >/dev/null 2>&1 & echo $!"],
                                 capture_output=True, text=True, check=True).stdout)
    with open(pid_file, "w") as f:
        f.write(str(pid))
    if then == "crash":
        os._exit(1)
    if then == "hang":
        time.sleep(10**6)
    return pid


def close_std_fds(x: int) -> int:
    os.close(0)
    os.close(1)
    os.close(2)
    return x


def say_hello(x: int) -> int:
    print(f"item {x} says hello", flush=True)
    print(f"item {x} to stderr", file=sys.stderr, flush=True)
    os.fstat(0)
    return x


def init_crash(how: str, log: str) -> None:
    """An initializer that kills its worker ("exit": os._exit(3); else a segfault), after
    logging its pid to ``log`` and saying what it was doing on stderr."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    print("loading the model from /models/big.onnx", file=sys.stderr, flush=True)
    if how == "exit":
        os._exit(3)
    ctypes.string_at(0)


# ---- on a dask cluster: the process above a lane is the dask worker ---------------------------

def _dask_worker_pid() -> int:
    """The dask worker hosting this lane: its parent, or its grandparent when the lane was forked
    by the workers' template (``stagepool._template``), itself the dask worker's child."""
    parent = os.getppid()
    with open(f"/proc/{parent}/cmdline", "rb") as f:
        if b"stagepool._template" not in f.read():
            return parent
    with open(f"/proc/{parent}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state: ppid


def kill_dask_worker(x: int) -> int:
    """At value 0, SIGKILL the dask worker hosting this lane (the lane then exits by itself)."""
    if x == 0:
        os.kill(_dask_worker_pid(), signal.SIGKILL)
        time.sleep(30)
    return x


def kill_dask_worker_midway(x: int) -> int:
    """At value 0, SIGKILL the dask worker hosting this lane after 0.3 s of work (a worker that
    dies mid-item, not in the milliseconds after its previous chunk ended: see the dask
    package docstring on what a worker's death within that report window blames)."""
    if x == 0:
        time.sleep(0.3)
        os.kill(_dask_worker_pid(), signal.SIGKILL)
        time.sleep(30)
    return x


def note_then_sleep(item: tuple[int, float, str]) -> int:
    """Write ``<dask worker pid>`` to ``folder/<index>`` when it starts, then sleep."""
    index, seconds, folder = item
    with open(os.path.join(folder, f"{index}.tmp"), "w") as f:
        f.write(str(_dask_worker_pid()))
    os.replace(os.path.join(folder, f"{index}.tmp"), os.path.join(folder, str(index)))
    time.sleep(seconds)
    return index


def hang_with_child_noting(item: tuple[int, str]) -> int:
    """At value 0, start a child process, write its pid to ``path`` and hang."""
    x, path = item
    if x == 0:
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        with open(path, "w") as f:
            f.write(str(child.pid))
        time.sleep(10**6)
    return x


def hang_on_zero_loop(x: int) -> int:
    """Tiny (``x * 2``), except that 0 spins for ever (a hang no signal handler interrupts)."""
    if x == 0:
        while True:
            pass
    return x * 2


def note_runs_then_sleep(item: tuple[int, float, str]) -> int:
    """Append ``<dask worker pid>`` as a line to ``folder/<index>`` each time it starts (one line
    per run, whatever becomes of it), then sleep."""
    index, seconds, folder = item
    with open(os.path.join(folder, str(index)), "a") as f:
        f.write(f"{_dask_worker_pid()}\n")
    time.sleep(seconds)
    return index


def cwd_of(_: Any) -> str:
    """The worker's working directory as Linux names it (``<path> (deleted)`` once removed)."""
    return os.readlink("/proc/self/cwd")


def shm_bytes_of(prefix: str, _item: Any) -> int:
    """Bytes held now by the /dev/shm files whose names start with ``prefix`` (an engine's
    segments: ``stagepool-<its pid>-``), seen from the worker running ``_item``."""
    total = 0
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            with contextlib.suppress(OSError):  # freed meanwhile
                total += os.stat(os.path.join("/dev/shm", name)).st_size
    return total
