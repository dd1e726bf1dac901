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
import time
from typing import Any

__all__ = ["STACK_SIGNAL", "capture_stderr"]

# The parent sends this before it kills an item that overran its timeout: faulthandler's C-level
# handler writes every thread's Python stack to the stderr pipe, even while the item is stuck in
# native code holding the GIL. A real-time signal, so that it clashes with no library's SIGUSR1.
STACK_SIGNAL = signal.SIGRTMIN + 3


def capture_stderr(stderr: Any) -> None:
    """Point fd 2 at the parent's pipe (``stderr``, closed here); faulthandler's dumps (segfault,
    abort, the parent's STACK_SIGNAL) go there too."""
    os.dup2(stderr.fileno(), 2)
    stderr.close()
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
