"""The machine's total and available memory from ``/proc/meminfo``, cheap enough for the memory
gate, which reads it every 100 ms from the thread that dispatches a batch's chunks.

The real file stays open and is read with one ``pread`` (~8 us, against ~30 to open, read and
close it, each step a GIL hand-off on that thread). A kept fd can be taken away by code that is
not ours: a library that closes every fd (``os.closerange``, a daemonizing helper), after which
the number is closed or names another file (a log, a socket, a fake meminfo). So every read first
checks with ``fstat`` that the fd still names the file this module opened (same device and
inode) and opens it again if not; the old number is never closed, since it is gone or someone
else's. A forked child reads through the fd it inherited (``pread`` moves no shared offset).

Imports nothing of the package: ``_resources`` reads through it.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import NamedTuple

__all__ = ["read_meminfo"]

_MEM_TOTAL = re.compile(rb"^MemTotal:[ \t]*([0-9]+) kB$", re.MULTILINE)
_MEM_AVAILABLE = re.compile(rb"^MemAvailable:[ \t]*([0-9]+) kB$", re.MULTILINE)
_MAX_BYTES = 1 << 16  # the kernel's file is ~1.5 KiB


class _Kept(NamedTuple):
    """The fd of the real ``/proc/meminfo`` and what it named when this module opened it."""

    fd: int
    dev: int
    ino: int


_kept: _Kept | None = None
_reopening = threading.Lock()  # two threads finding the fd gone open one file, not two


def _unlocked_in_child() -> None:
    """A fresh lock in a forked child: the fork copied it as a parent's thread held it, and that
    thread is not in the child (its first read would have waited forever)."""
    global _reopening
    _reopening = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_unlocked_in_child)


def read_meminfo(proc_root: Path) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes, or None where the file or a field is missing or odd
    (not Linux, a kernel before 3.14, a fake tree): the caller then asks psutil. Read directly,
    so that a script that builds an Engine does not pay for importing psutil (~15 ms of its
    start-up). Never raises for an unreadable file."""
    text = _meminfo_text(proc_root)
    if text is None:
        return None
    total, available = _MEM_TOTAL.search(text), _MEM_AVAILABLE.search(text)
    if total is None or available is None:
        return None
    kib = int(total[1])  # the kernel writes "kB"
    return kib * 1024, min(int(available[1]), kib) * 1024


def _meminfo_text(proc_root: Path) -> bytes | None:
    """The bytes of ``{proc_root}/meminfo``; the real one through the kept fd."""
    if str(proc_root) != "/proc":  # a fake tree (tests, tools): read as any file
        try:
            return (proc_root / "meminfo").read_bytes()
        except OSError:
            return None
    kept = _kept
    if kept is None or not _still_ours(kept):
        kept = _reopened(kept)
    if kept is None:
        return None
    try:
        return os.pread(kept.fd, _MAX_BYTES, 0)
    except OSError:
        return None


def _still_ours(kept: _Kept) -> bool:
    """Whether ``kept.fd`` still names the file this module opened."""
    try:
        st = os.fstat(kept.fd)
    except OSError:  # closed behind our back
        return False
    return st.st_dev == kept.dev and st.st_ino == kept.ino


def _reopened(stale: _Kept | None) -> _Kept | None:
    """``/proc/meminfo`` opened again (``stale``'s number is left alone), or None if it cannot be
    opened (no procfs, hidepid, out of fds)."""
    global _kept
    with _reopening:
        if _kept is not stale:  # another thread reopened it meanwhile
            return _kept
        try:
            fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        _kept = _Kept(fd, st.st_dev, st.st_ino)
        return _kept
