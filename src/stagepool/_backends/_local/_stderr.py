"""A worker's stderr, read by the pool thread: each line logged with the worker and its item.

A worker's fd 2 is a pipe (``_worker._capture_stderr``); FFmpeg warnings, prints and faulthandler
dumps all arrive here. Each complete line becomes one record of the ``stagepool.worker`` logger
(level WARNING) with ``extra`` fields ``worker`` (pid) and ``item`` (the batch index of the item
it was running when the line was read, or None), and a message that says both, so that a team's
log shows who wrote what even with a bare ``%(message)s`` format, or with no logging configured
at all (Python's last-resort handler prints WARNING records on stderr, as before).

Nothing is lost when a worker dies: a last line without its newline is logged when the lane is
closed, and the tail kept for crash reports (``tail``) is the raw bytes, dumps whole. The item is
what the shared record says at the moment of reading: a line written at the very end of an item
may be attributed to the next one on a busy machine (exact for dumps: a dying or hung worker is
still on its item).
"""

from __future__ import annotations

import logging

__all__ = ["LOGGER", "STDERR_TAIL_BYTES", "WorkerStderr"]

LOGGER = logging.getLogger("stagepool.worker")
STDERR_TAIL_BYTES = 16 * 1024  # kept for the crash report (the full faulthandler dump fits)
LINE_MAX_BYTES = 64 * 1024  # a "line" without a newline this long is logged as it is


class WorkerStderr:
    """The bytes one worker wrote to stderr: logged line by line, the last KiB kept."""

    __slots__ = ("_partial", "pid", "tail", "total")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tail = bytearray()
        self.total = 0  # bytes read so far: where a dump asked for at some moment starts
        self._partial = b""

    def feed(self, data: bytes, item: int | None) -> None:
        """Take what was read from the pipe; log its complete lines as written by ``item``."""
        self.total += len(data)
        self.tail += data
        del self.tail[:-STDERR_TAIL_BYTES]
        *lines, rest = (self._partial + data).split(b"\n")
        if len(rest) >= LINE_MAX_BYTES:
            lines.append(rest)
            rest = b""
        self._partial = rest
        for line in lines:
            self._log(line, item)

    def flush(self, item: int | None) -> None:
        """The worker is gone: its last words without a newline are still a line."""
        if self._partial:
            line, self._partial = self._partial, b""
            self._log(line, item)

    def since(self, mark: int) -> str:
        """What arrived after ``total`` was ``mark`` (as far as the tail reaches)."""
        kept = len(self.tail) - max(0, self.total - mark)
        return bytes(self.tail[max(0, kept) :]).decode("utf-8", "replace")

    def _log(self, raw: bytes, item: int | None) -> None:
        if not LOGGER.isEnabledFor(logging.WARNING):  # silenced: skip the decoding too
            return
        line = raw.decode("utf-8", "replace").rstrip("\r")
        who = f"worker {self.pid}" if item is None else f"worker {self.pid}, item {item}"
        LOGGER.warning("%s: %s", who, line, extra={"worker": self.pid, "item": item})
