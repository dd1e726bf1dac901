"""The kept ``/proc/meminfo`` fd (``_meminfo``): code that is not ours may close every fd, and the
number may then name another file; the memory gate must still read the machine, never that file,
and never close a number that is someone else's now."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stagepool import _meminfo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PROC = Path("/proc")
FAKE = b"MemTotal:        1 kB\nMemAvailable:    1 kB\n"


def kept_fd() -> int:
    """The fd the module keeps, after one read has opened it."""
    assert _meminfo.read_meminfo(PROC) is not None
    kept = _meminfo._kept
    assert kept is not None
    return kept.fd


def is_the_machine(read: tuple[int, int] | None) -> bool:
    return read is not None and read[0] == psutil.virtual_memory().total


def report_and_exit(write: int) -> None:  # pragma: no cover - runs in a forked child
    """In a forked child: write what it reads, then leave without running pytest's code."""
    try:
        read_there = _meminfo.read_meminfo(PROC)
        os.write(write, b"none" if read_there is None else b"%d %d" % read_there)
    finally:
        os._exit(0)


@pytest.fixture
def fake_meminfo(tmp_path: Path) -> Iterator[int]:
    """An open fd of a file that parses as a meminfo of 1 KiB."""
    path = tmp_path / "meminfo"
    path.write_bytes(FAKE)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_reads_the_machine_through_one_kept_fd() -> None:
    fd = kept_fd()
    assert is_the_machine(_meminfo.read_meminfo(PROC))
    assert kept_fd() == fd


def test_a_kept_fd_closed_behind_our_back_is_opened_again() -> None:
    os.close(kept_fd())  # what os.closerange(3, ...) in a library does to it
    assert is_the_machine(_meminfo.read_meminfo(PROC))


def test_a_kept_number_that_now_names_another_file_is_neither_read_nor_closed(
        fake_meminfo: int) -> None:
    fd = kept_fd()
    os.dup2(fake_meminfo, fd)  # closes ours; the number now names the fake (as reuse would)
    try:
        assert is_the_machine(_meminfo.read_meminfo(PROC))  # not (1024, 1024)
        assert os.pread(fd, 100, 0) == FAKE  # still open: it is not ours to close
        assert kept_fd() != fd
    finally:
        os.close(fd)


def child_report(pid: int, read: int, write: int) -> tuple[int, int]:
    """What the forked child ``pid`` wrote (``report_and_exit``), once it exited cleanly."""
    os.close(write)
    try:
        assert os.waitpid(pid, 0)[1] == 0
        total, available = map(int, os.read(read, 200).split())
    finally:
        os.close(read)
    return total, available


def test_a_forked_child_reads_through_the_inherited_fd() -> None:
    kept_fd()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report_and_exit(write)
    total, available = child_report(pid, read, write)
    assert total == psutil.virtual_memory().total
    assert 0 < available <= total


def test_a_child_forked_while_another_thread_opens_the_file_does_not_hang() -> None:
    """The fork copies the lock as the opening thread held it, a thread the child has not."""
    kept = _meminfo._kept
    read, write = os.pipe()
    with _meminfo._reopening:  # what a thread opening the file holds, for a few us
        _meminfo._kept = None  # ... before it has set the new fd
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
            signal.alarm(10)  # a hang kills the child: the test then fails, not hangs
            report_and_exit(write)
        _meminfo._kept = kept
    total, _ = child_report(pid, read, write)
    assert total == psutil.virtual_memory().total
