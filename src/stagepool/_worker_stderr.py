"""A worker's stderr and its stack on request: what the parent reads of a worker's last moments.

fd 2 becomes the parent's pipe (the parent logs each line with the worker and its item, and keeps
the tail for crash reports); faulthandler writes a segfault's dump there, and every thread's stack
when the parent sends STACK_SIGNAL before killing an item that overran its timeout. Imported by
``_worker`` only; like it, this module imports nothing heavy.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from typing import Any

__all__ = ["STACK_SIGNAL", "capture_stderr", "let_parent_read"]

# The parent sends this before it kills an item that overran its timeout: faulthandler's C-level
# handler writes every thread's Python stack to the stderr pipe, even while the item is stuck in
# native code holding the GIL. A real-time signal, so that it clashes with no library's SIGUSR1.
STACK_SIGNAL = signal.SIGRTMIN + 3

# How long a worker waits, after an item failed, for the parent to read what the item wrote to
# stderr (``let_parent_read``): a quiet parent reads within a millisecond; past this, a line may
# be logged with the next item, as before. Only after an item that ran READ_AFTER at least: the
# wait (~0.2 ms, the parent's wake-up) made 2,000 items that print a line and raise at once
# 2-3x slower (0.26-0.39 s -> 0.76-0.79 s); for a media item it is nothing.
READ_WAIT = 0.05
READ_AFTER = 0.001
_pipe: tuple[int, int] | None = None  # the parent's pipe on fd 2 (a pool worker): its identity


def capture_stderr(stderr: Any) -> None:
    """Point fd 2 at the parent's pipe (``stderr``, closed here); faulthandler's dumps (segfault,
    abort, the parent's STACK_SIGNAL) go there too."""
    global _pipe
    os.dup2(stderr.fileno(), 2)
    stderr.close()
    _pipe = _identity(2)
    faulthandler.enable(all_threads=False)  # the crashing thread; ours only watch the parent
    # A hung item's stack, through a private copy of the pipe: an item that points fd 2
    # elsewhere (silencing a noisy library) cannot lose it. Then (chained) _await_kill, so the
    # item the signal interrupted never answers.
    signal.signal(STACK_SIGNAL, _await_kill)
    faulthandler.register(STACK_SIGNAL, file=os.dup(2), all_threads=True, chain=True)


def _await_kill(_signum: int, _frame: object) -> None:
    """The parent took our stack because the item overran its timeout, and kills us next. An
    item the signal interrupted (a ``pause()``, a read that gives up on EINTR) must not go on
    and answer as if it had finished in time: wait here for the kill."""
    while True:
        time.sleep(60)


def let_parent_read(ran: float) -> None:
    """After an item failed, having run ``ran`` seconds (0.0: unknown, a tiny item; under
    ``READ_AFTER`` nothing is done): wait (at most ``READ_WAIT``) until the parent has read what
    is in the stderr pipe, so that it logs those lines (FFmpeg's warnings about a damaged segment)
    with this item, which the shared record still names, rather than with the next one: the
    parent names the item a line came from by where the worker is when it reads the line, and
    on a busy machine it read a failed item's warnings after the worker had moved on. A failure
    that wrote nothing costs one ``ioctl``."""
    if _pipe is None or ran < READ_AFTER:
        return
    import fcntl
    import termios

    deadline = time.monotonic() + READ_WAIT
    while True:
        try:
            unread = int.from_bytes(fcntl.ioctl(2, termios.FIONREAD, bytes(4)), sys.byteorder)
            if not unread or _identity(2) != _pipe:  # nothing left, or the item replaced fd 2
                return
        except OSError:  # the item closed fd 2
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.0005)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
