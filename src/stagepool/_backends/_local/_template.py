"""The parent's side of the warm template (the child's side, and why, is ``stagepool._template``).

``Template`` starts the template process (a plain ``python`` with the workers' environment,
``posix_spawn``-ed: safe from a threaded parent, and free of loky's own start-up imports), or
adopts the one started at the first access to ``stagepool.Engine`` (``_template_boot``), asks
it to fork workers, and learns their exit codes from it: a forked worker is the template's child,
not ours, so ``ForkedProcess`` stands in for a ``multiprocessing.Process``: ``pid``, a
``sentinel`` (a pidfd: readable when the process exits), ``exitcode`` and ``join``.

Only one thread uses a Template at a time (the pool thread, or the constructor before it runs).
Where the platform has no pidfds (not Linux >= 5.3), or the template cannot start or dies, the
crew falls back to loky's fork+exec for every later worker: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import sendfds
from typing import Any

from ..._template_boot import WORKER_MALLOC_ENV, launch, take_early
from ..._template_boot import supported as supported
from ..._worker import WorkerSetup, dumps

__all__ = ["ForkedProcess", "Template", "TemplateGone", "supported"]

# How long the template may take to start and import the preloaded modules (a cold scipy import
# on a loaded machine takes seconds) before the crew gives up on it and starts workers itself.
READY_TIMEOUT = 60.0


class TemplateGone(Exception):
    """The template process is not there (any more): start workers another way."""


class Template:
    """A running template process and the exit codes of the workers it forked."""

    def __init__(self, env: dict[str, str], preload: tuple[str, ...]) -> None:
        wanted = {**os.environ, **env}
        # What the engine adds beyond the malloc settings (the BLAS thread budget) is read only
        # when numpy loads: a template started before the engine knew it gets it in its hello.
        late = [var for var in env if var not in WORKER_MALLOC_ENV]
        launched = take_early(wanted, late) or launch(wanted)
        self._sock = launched.sock
        self._conn = Connection(os.dup(self._sock.fileno()))
        self.process = launched.process
        self._exits: dict[int, int] = {}
        self._pid: int | None = None
        self.failed_preload: list[str] = []
        self._send(pickle.dumps((list(sys.path), preload, wanted)))

    def spawn(self, setup: WorkerSetup, fds: tuple[int, int]) -> ForkedProcess:
        """Fork a worker running ``lane_main`` with ``setup`` on the given pipe ends. Raises
        TemplateGone when the template is not serving (the caller starts the worker itself)."""
        self._ready()
        self._send(pickle.dumps((dumps(setup), list(sys.path))))
        try:
            sendfds(self._sock, list(fds))
        except OSError as exc:
            raise TemplateGone(f"the template's socket failed: {exc}") from exc
        while True:
            message = self._receive(READY_TIMEOUT)
            if message[0] == "pid":
                return ForkedProcess(self, message[1])

    def exitcode(self, pid: int, timeout: float = 0.0) -> int | None:
        """The worker's exit code once the template reaped it, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while pid not in self._exits:
            remaining = deadline - time.monotonic()
            try:
                if not self._conn.poll(max(0.0, remaining)):
                    return None
                self._receive(0.0)
            except (TemplateGone, OSError, EOFError):
                return None  # its reaper is gone: no code to learn
        return self._exits[pid]

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)

    def close(self) -> None:
        """Close the socket and end the template at once (the crew has killed the workers; a
        child it missed exits when it sees its parent gone), then reap it."""
        for closer in (self._conn.close, self._sock.close):
            with contextlib.suppress(OSError):
                closer()
        with contextlib.suppress(OSError):
            self.process.kill()  # it has nothing left to do: no need to wait for a clean exit
        self.process.wait()

    def _ready(self) -> None:
        while self._pid is None:
            message = self._receive(READY_TIMEOUT)
            if message[0] == "ready":
                self._pid, self.failed_preload = message[1], message[2]
                for failure in self.failed_preload:
                    print(f"stagepool: preload could not import {failure}; workers import it "
                          "themselves when needed", file=sys.stderr)

    def _send(self, blob: bytes) -> None:
        try:
            self._conn.send_bytes(blob)
        except OSError as exc:
            raise TemplateGone(f"the template's socket failed: {exc}") from exc

    def _receive(self, timeout: float) -> Any:
        """One message from the template; exit reports are recorded on the way."""
        try:
            if not self._conn.poll(timeout):
                raise TemplateGone(f"the template did not answer within {timeout:.0f} s")
            message = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise TemplateGone(f"the template exited (code {self.process.poll()})") from exc
        if message[0] == "exit":
            self._exits[message[1]] = message[2]
        return message


class ForkedProcess:
    """What the crew needs of a worker's process when the template, not we, is its parent."""

    def __init__(self, template: Template, pid: int) -> None:
        self._template = template
        self.pid = pid
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:  # already exited and reaped: a sentinel that fires at once
            read, write = os.pipe()
            os.close(write)
            self.sentinel = read

    @property
    def exitcode(self) -> int | None:
        return self._template.exitcode(self.pid)

    def join(self, timeout: float | None = None) -> None:
        self._template.exitcode(self.pid, READY_TIMEOUT if timeout is None else timeout)

    def close_sentinel(self) -> None:
        """The worker was reaped: free the pidfd and the exit code the template sent."""
        self._template.forget(self.pid)
        with contextlib.suppress(OSError):
            os.close(self.sentinel)
