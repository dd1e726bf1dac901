"""Guards against hostile items, inside a worker: forks, closed standard fds, descendants, a
dead parent.

An item may fork a child that comes back into the worker's loop, close fd 1, start processes
that outlive it, or outlive its caller (SIGKILLed). Each guard here keeps one promise of the
pool: only the worker answers, later items can still print, nothing an item started survives
the worker, and no worker survives its caller. Imported by ``_worker`` only; like it, this
module imports nothing heavy (no numpy, no psutil, no loky).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from typing import NoReturn

from . import _shm

__all__ = [
    "PARENT_EXIT_WAIT",
    "StdFds",
    "die_with_parent",
    "explain_memory_error",
    "flush_std_streams",
    "forked_children",
    "guard_items",
    "lead_own_group",
    "leave_fork",
    "mark_forked",
    "parent_gone",
    "pipe_broken",
    "watch_parent",
]

# In a child forked by an item, os.register_at_fork marks this list (the worker's own list stays
# empty): run_chunk checks it after a failed item and after its loop, cheaper than a getpid()
# call per item.
forked_children: list[int] = []
# The items of the chunk running now (a list), which a forked child empties: its loop in
# run_chunk then ends with the item that forked, and it leaves there. Without it, the child
# would run the chunk's next items (twice their side effects), or the loop would pay a test
# per item.
_running: list[list[object]] = []


def guard_items(items: object) -> None:
    """``items`` is the chunk now running (None: none is)."""
    _running[:] = [items] if type(items) is list else []


def mark_forked() -> None:
    forked_children.append(os.getpid())
    for items in _running:
        items.clear()


def leave_fork(exc: BaseException | None) -> NoReturn:
    """A child forked by an item came back to the worker's code: end it now, as if it had run
    as a script, without touching the pipe or the record, which belong to the worker.

    The exit status is what the item's parent side may wait for: 0 after a return, the code of
    ``sys.exit(code)``, 1 (and the traceback on stderr) after any other exception. Buffered
    stdout is not flushed: it may hold the worker's own output, copied by the fork.
    """
    code = 0
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            code = 1
            print(exc.code, file=sys.stderr)
    elif exc is not None:
        code = 1
        traceback.print_exception(exc)
    with contextlib.suppress(BaseException):
        sys.stderr.flush()
    os._exit(code)


def lead_own_group() -> None:
    """Put the worker in a process group of its own, which everything its items start joins:
    when the worker dies, the parent kills that group (``_resources.kill_group``), so a child
    process cannot outlive a crash and hold the caller's stdout open (``job.py | cat`` waiting
    forever). Processes that start their own session escape; they are the item's to manage."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


class StdFds:
    """Keeps a copy of fds 0, 1 and 2 and puts one back when an item closed it: else every later
    item that prints fails with EBADF, and the next file opened takes the number.

    One fstat per fd and chunk. An fd an item replaced (``dup2``) is left as it is: silencing a
    noisy library for good is a thing workers do.
    """

    def __init__(self) -> None:
        self._copies: dict[int, int] = {}
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):  # closed at start-up: nothing to put back
                self._copies[fd] = os.dup(fd)  # not inherited by the items' child processes

    def restore(self) -> None:
        for fd, copy in self._copies.items():
            try:
                os.fstat(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.dup2(copy, fd)


def pipe_broken(ppid: int, owner: int | None = None) -> None:
    """The pipe to the parent broke (EOF, or EPIPE on send). If the parent died, clean up after
    it and exit (never returns); if it closed the pipe on purpose, return: the worker ends.

    The pipe closes a moment before the kernel re-parents the worker, so "alive" at this point
    is checked again for a while before it is believed.
    """
    deadline = time.monotonic() + PARENT_EXIT_WAIT
    while not parent_gone(ppid):
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)
    die_with_parent(ppid if owner is None else owner)


PARENT_EXIT_WAIT = 2.0  # seconds; see pipe_broken
_dying = threading.Lock()


def die_with_parent(ppid: int) -> NoReturn:
    """The parent is gone: nobody else will free its shared memory or stop what this worker's
    items started, so do both, then exit. Called by the watch thread or the main loop, whichever
    notices first; the other waits on the lock until the process is gone."""
    with _dying:
        _shm.abandon(ppid)
        flush_std_streams()
        if os.getpgrp() == os.getpid():  # never the caller's group (if setpgid failed)
            os.killpg(0, signal.SIGKILL)  # this process too: it is the last thing it does
        os._exit(3)


def flush_std_streams() -> None:
    """What items printed is real output; the parent end of stderr may be gone (EPIPE)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            if stream is not None:
                stream.flush()


def parent_gone(ppid: int) -> bool:
    if os.getppid() != ppid:
        return True
    try:
        os.kill(ppid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def watch_parent(ppid: int, owner: int | None = None) -> None:
    """Exit when the parent dies (re-parented), so a SIGKILLed caller leaves no worker behind,
    even while an item runs (the main thread notices only when it next uses the pipe).
    ``owner``: whose shared memory to free then, when not the parent's (a template's child)."""
    while True:
        time.sleep(0.25)
        if parent_gone(ppid):
            die_with_parent(ppid if owner is None else owner)


# The memory cap (RLIMIT_DATA, bytes) this worker runs under, once set; None: no cap.
memory_cap: int | None = None


def explain_memory_error(exc: BaseException) -> None:
    """A ``MemoryError`` under the engine's cap says which cap and how to lift it: by default
    it comes from ``mem_per_task``, which callers read as a sizing hint only."""
    if isinstance(exc, MemoryError) and memory_cap is not None:
        exc.add_note(
            f"stagepool: this worker's private memory is capped at {memory_cap / 2**20:.0f} MiB "
            "(2 x max_rss_per_worker + 512 MiB, or by default 4 x mem_per_task + 512 MiB): "
            "raise mem_per_task or max_rss_per_worker for bigger items")
