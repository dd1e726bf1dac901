"""Starting the warm template's interpreter, possibly before an Engine asks for it.

The template (``_template``: the process the local workers are forked from) is a fresh
interpreter, and booting it (the interpreter, ``site``, the worker's modules) is most of what a
short script waits for before its first result. So the first access to ``stagepool.Engine``
starts it at once (``start_early``), and it boots on another core while this process imports
the engine; the first local Engine adopts it (``take_early``):

    stagepool.Engine (first access) --start_early()--> template boots, imports _worker, waits
    Engine(...) -> Template(env) --take_early(env)--> hello (sys.path, preload, env) -> "ready"

Nothing is lost by starting early. A template is adopted only when it is what the engine would
have started itself: same process, interpreter (``sys.executable``) and working directory, same
environment, except the variables the template sets from the hello before anything reads them
(the BLAS thread budget, read when numpy loads). Otherwise, or when it is near its idle limit,
it is closed and a new one starts.
One that no engine adopts exits after ``EARLY_IDLE`` seconds (it waits for its hello that long),
or with this process (its socket closes); a non-local engine, or an ``Engine()`` that raises,
closes it at once. A forked child never touches its parent's. Inside a worker
(``STAGEPOOL_WORKER_THREADS`` is set: a stage that builds its own engine), or with
``STAGEPOOL_EARLY_TEMPLATE=0``, nothing starts early.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import ParamSpec

__all__ = ["BOOT", "EARLY_IDLE", "WORKER_MALLOC_ENV", "Launched", "discard_early",
           "discard_on_failure", "launch", "start_early", "supported", "take_early", "worker_env"]

P = ParamSpec("P")

# glibc returns every freed block above its (adaptive) mmap threshold to the kernel, so a stage
# that allocates ~14 MiB of temporaries per item page-faults all of it again on every item: the
# demo stage measured 22 ms per item in a fresh worker and 14.5 ms with these settings (the
# profiler's finding). Up to 64 MiB of freed heap stays in each worker. A user's own setting wins.
# glibc reads them when the process starts: they are in the template's environment from its exec.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                     "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}
# How long a template started early waits for an engine to adopt it before it exits. Long enough
# for a script that reads its inputs before building the engine; an idle interpreter meanwhile.
EARLY_IDLE = 30.0
# Set in every worker (see _threads): a stage that builds an engine there starts nothing early.
_IN_WORKER = "STAGEPOOL_WORKER_THREADS"
# STAGEPOOL_EARLY_TEMPLATE=0: start nothing before an Engine asks (a process that only imports
# the class, say for type checks or --help, then never runs one).
_OPT_OUT = "STAGEPOOL_EARLY_TEMPLATE"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # holds stagepool/
BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(2)); "
        "from stagepool._template import main; main()")


def supported() -> bool:
    """Where the template can serve: forking it and watching its children need Linux pidfds."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and hasattr(os, "fork")


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The malloc settings the workers get, less those the user set."""
    env = os.environ if environ is None else environ
    return {var: value for var, value in WORKER_MALLOC_ENV.items() if var not in env}


class Launched:
    """A template process just started: its Popen, our end of its socket, and what it got."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.cwd, self.owner = env, os.getcwd(), os.getpid()
        self.executable = sys.executable  # a virtualenv switch after the import changes it
        self.started = time.monotonic()
        ours, theirs = socket.socketpair()
        with theirs:
            try:
                self.process = subprocess.Popen(
                    [sys.executable, *_interpreter_flags(), "-c", BOOT, str(theirs.fileno()),
                     PACKAGE_ROOT, str(EARLY_IDLE)],
                    pass_fds=(theirs.fileno(),), env=env,
                    process_group=0)  # Ctrl-C at a terminal is the caller's, not the template's
            except BaseException:
                ours.close()
                raise
        self.sock = ours

    def close(self) -> None:
        """End the process at once and reap it (it has forked nothing yet)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()


def launch(env: dict[str, str]) -> Launched:
    """Start a template now with exactly this environment."""
    return Launched(env)


_early: Launched | None = None


def start_early() -> None:
    """Start the template for the first local engine now, once per process; never raises (an
    engine then starts its own, and says why if that fails too)."""
    global _early
    if (_early is not None or not supported() or _IN_WORKER in os.environ
            or os.environ.get(_OPT_OUT, "1").strip() == "0"):
        return
    try:
        _early = launch({**os.environ, **worker_env()})
    except (OSError, ValueError, subprocess.SubprocessError):
        return
    atexit.register(discard_early)


def take_early(env: Mapping[str, str], late: Collection[str]) -> Launched | None:
    """The template started early, if it is what ``launch(env)`` would start now; variables in
    ``late`` may differ (the template sets them from its hello). Else it is closed: None."""
    global _early
    early, _early = _early, None
    if early is None:
        return None
    if early.owner != os.getpid():  # a forked child's copy: the parent's to use, not ours to
        early.sock.close()  # keep open (the template would outlive the parent waiting for it)
        return None
    # Half its idle time at most: one about to leave would take the hello with it.
    fresh = time.monotonic() - early.started < EARLY_IDLE / 2 and early.process.poll() is None
    same = (early.cwd == os.getcwd() and early.executable == sys.executable
            and _without(early.env, late) == _without(env, late))
    if not (fresh and same):
        early.close()
        return None
    return early


def discard_early() -> None:
    """Close a template started early that no engine will adopt (a non-local or refused engine,
    the interpreter's exit)."""
    global _early
    early, _early = _early, None
    if early is None:
        return
    if early.owner == os.getpid():
        early.close()
    else:
        early.sock.close()


def discard_on_failure(init: Callable[P, None]) -> Callable[P, None]:
    """``Engine.__init__``, closing the template started early when the engine is refused (a
    bad option, too many workers for the open-files limit): a refused engine leaves no process."""
    @functools.wraps(init)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            init(*args, **kwargs)
        except BaseException:
            discard_early()
            raise

    return guarded


def _without(env: Mapping[str, str], keys: Collection[str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in keys}


def _interpreter_flags() -> list[str]:
    """The parent interpreter's -X/-W/-O flags, as multiprocessing passes them to its children."""
    return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
