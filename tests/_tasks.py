"""Task functions for the tests: module-level so workers import them by reference."""

from __future__ import annotations

import ctypes
import os
import signal
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


class NeedsTwoArgs(Exception):
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


# ---- on a dask cluster: the process above a lane is the dask worker ---------------------------

def kill_dask_worker(x: int) -> int:
    """At value 0, SIGKILL the dask worker hosting this lane (the lane then exits by itself)."""
    if x == 0:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
    return x


def note_then_sleep(item: tuple[int, float, str]) -> int:
    """Write ``<dask worker pid>`` to ``folder/<index>`` when it starts, then sleep."""
    index, seconds, folder = item
    with open(os.path.join(folder, f"{index}.tmp"), "w") as f:
        f.write(str(os.getppid()))
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
