"""The warm template: one process that imports the worker's modules once and forks every worker.

A worker started from scratch is a fresh interpreter that imports the worker's code, cloudpickle
and then the stage's own modules (numpy, scipy, a codec) before it takes its first item: about
0.1-0.6 s on a loaded 2-core machine, paid at start-up and again after every timeout, crash,
kill or recycle. The template pays it once; a worker forked from it starts warm in milliseconds.

    parent (_backends/_local/_template.py)              template (this module, main())
                                                            imports the worker's modules first
      hello: sys.path, preload, environment  ---------->  imports them; "ready"
      spawn: setup, sys.path + fds (pipe, stderr)  ---->  fork() -> child: lane_main(...)
      <------------------------------------------------   ("pid", pid)
      <------------------------------------------------   ("exit", pid, exitcode) on SIGCHLD

The template is single-threaded (a fork copies only the calling thread) and runs nothing else.
Each child forgets the template (its socket, its signal plumbing), gets fresh random seeds
(``random`` reseeds itself at fork; numpy's global generator is reseeded here) and then is an
ordinary worker, which watches its parent, the template; the template exits when its own parent
(the engine's process) closes the socket or dies, so a dead caller leaves no worker behind.

The worker's modules are imported before the hello is read: a template started at the first
access to ``stagepool.Engine`` (``_template_boot``) imports them while its parent still imports the
engine. The hello's environment replaces the one the template started with (they differ only in
the BLAS thread budget, which nothing has read yet).

Failure: a preload module that fails to import is reported in "ready" (the workers then import
it themselves, when an item needs it); a child that cannot set up prints why and exits 1. A
template whose hello does not come in time (``_template_boot.EARLY_IDLE``: started early for an
engine never built) or whose parent closes the socket first exits 0.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recvfds
from typing import Any

__all__ = ["main"]


def main() -> None:
    """Serve spawn requests on the socket whose fd is ``sys.argv[1]`` until it closes; exit if
    no hello comes within ``sys.argv[2]`` seconds."""
    conn = Connection(int(sys.argv[1]))
    from . import _worker  # noqa: F401  # what every child runs, imported once here

    hello = _hello(conn, float(sys.argv[2]))
    if hello is None:
        return
    sys_path, preload, environ = hello
    _set_environ(environ)
    sys.path[:] = sys_path
    failed = _preload(preload)
    conn.send_bytes(pickle.dumps(("ready", os.getpid(), failed)))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd does the work
    _serve(conn, wake_read, wake_write)


def _hello(conn: Connection, idle: float) -> Any:
    """The engine's (sys.path, preload, environment), or None: no engine came for a template
    started early, or the parent closed the socket (or exited) first."""
    try:
        if not conn.poll(idle):
            return None
        return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return None


def _set_environ(environ: dict[str, str]) -> None:
    """Make this process's environment (and so its workers') the one the engine asked for."""
    for var in set(os.environ) - set(environ):
        del os.environ[var]
    for var, value in environ.items():
        if os.environ.get(var) != value:
            os.environ[var] = value


def _preload(modules: tuple[str, ...]) -> list[str]:
    failed = []
    for name in modules:
        try:
            __import__(name)
        except BaseException as exc:  # a broken module must not take the template down
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def _serve(conn: Connection, wake_read: int, wake_write: int) -> None:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    while True:
        for ready in wait([conn, wake_read]):
            if ready == wake_read:
                os.read(wake_read, 4096)
                _report_exits(conn)
                continue
            try:
                request = conn.recv_bytes()
                fds = recvfds(sock, 2)
            except (EOFError, OSError):  # the engine closed us, or died: its workers follow
                return
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(conn, (wake_read, wake_write), request, fds)
            for fd in fds:
                os.close(fd)
            conn.send_bytes(pickle.dumps(("pid", pid)))


def _report_exits(conn: Connection) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn.send_bytes(pickle.dumps(("exit", pid, os.waitstatus_to_exitcode(status))))


def _child(conn: Connection, wake: tuple[int, int], request: bytes, fds: list[int]) -> None:
    """In the forked child: drop the template's plumbing, then run an ordinary worker."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (conn.fileno(), *wake):
            os.close(fd)
        _reseed()
        code = _run_worker(request, fds)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _run_worker(request: bytes, fds: list[int]) -> int:
    import dataclasses

    from ._worker import lane_main
    from ._worker_guards import flush_std_streams

    setup_blob, sys_path = pickle.loads(request)
    sys.path[:] = sys_path
    setup = dataclasses.replace(pickle.loads(setup_blob), parent=os.getppid())
    lane_main(Connection(fds[0]), Connection(fds[1]), setup)
    atexit._run_exitfuncs()  # as a worker's normal exit would: what items registered runs
    flush_std_streams()
    return 0


def _reseed() -> None:
    """A child must not replay its siblings' random numbers (``random`` reseeds at fork)."""
    numpy_random: Any = sys.modules.get("numpy.random")  # not imported: nothing to reseed
    if numpy_random is not None:
        numpy_random.seed()


if __name__ == "__main__":
    main()
