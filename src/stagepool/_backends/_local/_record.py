"""The parent's side of the shared record: one slot per worker saying which item it is on.

A worker writes its slot (``_worker_loop.run_chunk``: chunk id, item offset, start time, phase) with
single stores into a memory file; the pool thread reads it when the worker dies (exact blame),
and to compute deadlines for per-item timeouts. The layout (``SLOT_STRIDE``, ``F_*``,
``PHASE_*``) is defined once, in ``_worker``, for both sides.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from typing import NamedTuple

from ..._worker_loop import (
    F_CHUNK,
    F_OFFSET,
    F_PHASE,
    F_PID,
    F_START,
    PHASE_IDLE,
    PHASE_RUN,
    SLOT_STRIDE,
)
from .._protocol import LaneState

__all__ = ["SharedRecord", "SlotState", "lane_state"]


class SlotState(NamedTuple):
    """One worker's slot, read at one moment."""

    chunk: int  # the task id it is on (0: none yet)
    offset: int  # the item's position in the chunk (-1: not on an item)
    phase: int  # PHASE_IDLE, PHASE_DECODE, PHASE_RUN or PHASE_ENCODE
    start: float  # time.monotonic() when the item (tiny items: the chunk) started


class _SharedFile:
    """A memory file the workers open by path: a memfd on Linux (freed with its last user, even
    if the parent is SIGKILLed), else a temporary file removed at close."""

    def __init__(self, name: str, size: int) -> None:
        self._tmp: str | None = None
        if hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
            self.fd = os.memfd_create(name)
            self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        else:  # pragma: no cover - non-Linux
            self.fd, self._tmp = tempfile.mkstemp(prefix=f"{name}-")
            self.path = self._tmp
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)


class SharedRecord:
    """``slots`` worker slots in a memory file that workers map by ``path``."""

    def __init__(self, slots: int) -> None:
        self._file = _SharedFile("stagepool-record", 8 * SLOT_STRIDE * slots)
        self._map = mmap.mmap(self._file.fd, 0)
        self._ints = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")

    @property
    def path(self) -> str:
        return self._file.path

    def reset(self, slot: int) -> None:
        """A fresh worker's slot: on no chunk, no item, idle."""
        base = slot * SLOT_STRIDE
        self._ints[base + F_PID] = 0  # the worker writes its pid when it has mapped the record
        self._ints[base + F_CHUNK] = 0
        self._ints[base + F_OFFSET] = -1
        self._ints[base + F_PHASE] = PHASE_IDLE

    def pid(self, slot: int) -> int:
        """The pid of the worker using the slot, 0 until it has started."""
        return int(self._ints[slot * SLOT_STRIDE + F_PID])

    def offset(self, slot: int) -> int:
        return int(self._ints[slot * SLOT_STRIDE + F_OFFSET])

    def state(self, slot: int) -> SlotState:
        base = slot * SLOT_STRIDE
        # The chunk before the offset: the worker resets the offset before naming a new chunk
        # (_worker._handle), so an offset read after the chunk is never the chunk before's.
        chunk = int(self._ints[base + F_CHUNK])
        # The offset before the start time: the worker writes the start time first, so a start
        # read after the offset is never older than that offset's item (see run_chunk).
        offset = int(self._ints[base + F_OFFSET])
        start = float(self._floats[base + F_START])
        return SlotState(chunk, offset, int(self._ints[base + F_PHASE]), start)

    def close(self) -> None:
        self._ints.release()
        self._floats.release()
        self._map.close()
        self._file.close()


def lane_state(record: SharedRecord, pid: int, slot: int, has_tasks: bool) -> LaneState:
    """A lane's state for ``status()``: the item its slot names while it runs one, else idle.
    Decoding and encoding count as busy on the chunk, item unknown."""
    state = record.state(slot)
    if not has_tasks or state.phase == PHASE_IDLE:
        return LaneState(str(pid), 0, -1, None)
    if state.phase != PHASE_RUN or state.offset < 0:
        return LaneState(str(pid), state.chunk, -1, None)
    return LaneState(str(pid), state.chunk, state.offset, state.start)
