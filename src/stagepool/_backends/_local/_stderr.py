"""A worker's stderr, read by the pool thread: each line logged with the worker and its item.

A worker's fd 2 is a pipe (``_worker._capture_stderr``); FFmpeg warnings, prints and faulthandler
dumps all arrive here. Each complete line becomes one record of the ``stagepool.worker`` logger
(level WARNING) with ``extra`` fields ``worker`` (pid) and ``item`` (the batch index of the item
it was running when the line was read, or None), and a message that says both, so that a team's
log shows who wrote what even with a bare ``%(message)s`` format, or with no logging configured
at all (Python's last-resort handler prints WARNING records on stderr, as before).

Nothing is lost when a worker dies: a last line without its newline is logged when the lane is
closed, and the tail kept for crash reports (``tail``) is the raw bytes, dumps whole. The item is
what the shared record says just before the read: a line written at the very end of an item
may be attributed to the next one on a busy machine, except when the item failed after 1 ms or
more (the worker waits up to 50 ms for this read: ``_worker_stderr.let_parent_read``) and for
dumps (a dying or hung worker is still on its item); and a line the next item writes between
that look and the read goes with the item before (measured: 2 ms items, 3 CPU-bound threads
in the parent, ~60% of lines on another item either way; exact would need the worker to
mark item boundaries in the pipe). A line without its newline (a progress counter) is ended
at the item boundary: once the worker is seen on another item, it is logged with the item it
was read on, not glued to what the next item writes; what one read returns is not split.
"""

from __future__ import annotations

import logging

__all__ = ["LOGGER", "STDERR_TAIL_BYTES", "WorkerStderr"]

LOGGER = logging.getLogger("stagepool.worker")
STDERR_TAIL_BYTES = 16 * 1024  # kept for the crash report (the full faulthandler dump fits)
LINE_MAX_BYTES = 64 * 1024  # a "line" without a newline this long is logged as it is


class WorkerStderr:
    """The bytes one worker wrote to stderr: logged line by line, the last KiB kept."""

    __slots__ = ("_partial", "_partial_at", "_partial_item", "pid", "tail", "total")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tail = bytearray()
        self.total = 0  # bytes read so far: where a dump asked for at some moment starts
        self._partial = b""
        self._partial_item: int | None = None  # the item the unfinished line was read on
        self._partial_at: object = None  # and where the worker was then (chunk, offset)

    def feed(self, data: bytes, item: int | None, at: object = None) -> None:
        """Take what was read from the pipe; log its complete lines as written by ``item``.
        ``at`` says where the worker is (None: unknown); a new place ends an unfinished line."""
        self.total += len(data)
        self.tail += data
        del self.tail[:-STDERR_TAIL_BYTES]
        if self._partial and at is not None and at != self._partial_at:
            self.flush()  # the item boundary: the line was its item's, whatever follows
        if not self._partial:
            self._partial_item, self._partial_at = item, at
        *lines, rest = (self._partial + data).split(b"\n")
        if len(rest) >= LINE_MAX_BYTES:
            lines.append(rest)
            rest = b""
        self._partial = rest
        if lines:  # the first line began with the unfinished one: its item, read earlier
            self._log(lines[0], self._partial_item)
        for line in lines[1:]:
            self._log(line, item)
        if lines:  # what is left began in this read
            self._partial_item, self._partial_at = item, at

    def flush(self) -> None:
        """The worker is gone, or on its next item: an unfinished line is still a line, logged
        with the item it was read on."""
        if self._partial:
            line, self._partial = self._partial, b""
            self._log(line, self._partial_item)

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
