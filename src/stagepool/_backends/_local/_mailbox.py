"""How other threads reach the pool thread: a self-pipe it waits on, and a queue of calls.

Lock-free on the sending side, so that ``post`` is safe from a garbage collector's finalizer in
the middle of any thread (the pool thread included, holding any lock).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable

__all__ = ["Mailbox"]


class Mailbox:
    """``fd`` becomes readable after ``wake``; the pool thread then calls ``drain`` and
    ``run_calls``. After ``close`` every wake-up is a no-op."""

    def __init__(self) -> None:
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self.fd, self.wake_w = os.pipe()
        self._wake_pending = False
        os.set_blocking(self.wake_w, False)

    def wake(self) -> None:
        # One byte in the pipe is enough: a burst of submits between two turns of the pool loop
        # costs one write, not one each. The pool thread drains the pipe, then clears the flag,
        # then looks at the queues: a task queued before a skipped write is seen by that look,
        # and a write after the clear wakes the next turn.
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"!")

    def post(self, fn: Callable[[], None]) -> None:
        """Have the pool thread call ``fn`` at its next turn."""
        self._calls.append(fn)  # deque.append is atomic: no lock, so safe from a finalizer
        self.wake()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.fd, 4096)
        # After the read: cleared before it, a byte written in between would be drained
        # with the flag left set, and every later wake-up skipped (a hang).
        self._wake_pending = False

    def run_calls(self) -> None:
        while True:
            try:
                call = self._calls.popleft()
            except IndexError:
                return
            call()

    def close(self) -> None:
        # A wake-up after this point must not write: the fd number may already belong to a file
        # or socket opened elsewhere in the process (withdraw() can run at any time, even late).
        self._wake_pending = True
        for fd in (self.fd, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
