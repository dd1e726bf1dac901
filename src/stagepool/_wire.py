"""A lane's task message: what the pool thread writes to a worker's pipe for one chunk.

    [ header: chunk id, fn key, n items, fn length, flags, budget ][ fn pickle ][ items ]

One message per task, so one write and one read: the function's pickle only when the worker does
not have it cached yet, and the items inline unless they are bigger than ``INLINE_ITEMS`` (then
they follow as a second message, written to the pipe without a copy). The header is a struct,
not a pickle: for a single submit, pickling and unpickling a named tuple header (its class looked
up by name each time) was ~8 us of a ~60 us turn of the pool thread and the worker.

Imported by workers: nothing heavy.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["INLINE_ITEMS", "TaskHeader", "pack_task", "unpack_task"]


class TaskHeader(NamedTuple):
    """What a task tells a worker besides its items (``pack_task`` puts it on the wire)."""

    chunk_id: int
    fn_key: int
    fn_blob: bytes | None  # only when the worker does not have this function cached yet
    n_items: int
    timed: bool  # a per-item timeout is running: clocked items write their start times
    per_item_clock: bool
    # Seconds after which the worker stops between items and answers with the items run so far
    # (0.0: never). A chunk cut before anything is known of its items' cost: see _chunking.
    budget: float = 0.0


_TASK_HEAD = struct.Struct("<qqqqBd")  # chunk id, fn key, n items, fn_len, flags, budget
_TIMED, _PER_ITEM_CLOCK, _ITEMS_FOLLOW = 1, 2, 4
INLINE_ITEMS = 64 * 1024


def pack_task(header: TaskHeader, items: bytes) -> tuple[bytes, bytes | None]:
    """The task's first message, and its items as a second message when they are big."""
    fn_blob = header.fn_blob or b""
    follow = len(items) > INLINE_ITEMS
    flags = (_TIMED * header.timed) | (_PER_ITEM_CLOCK * header.per_item_clock) | (
        _ITEMS_FOLLOW * follow)
    head = _TASK_HEAD.pack(header.chunk_id, header.fn_key, header.n_items, len(fn_blob), flags,
                           header.budget)
    if follow:
        return head + fn_blob, items
    return b"".join((head, fn_blob, items)), None


def unpack_task(message: bytes) -> tuple[TaskHeader, memoryview | None]:
    """The header of a task's first message, and its items if they came with it (else None:
    they are the next message)."""
    chunk_id, fn_key, n_items, fn_len, flags, budget = _TASK_HEAD.unpack_from(message)
    start = _TASK_HEAD.size
    fn_blob = message[start : start + fn_len] if fn_len else None
    items = None if flags & _ITEMS_FOLLOW else memoryview(message)[start + fn_len :]
    return TaskHeader(chunk_id, fn_key, fn_blob, n_items, bool(flags & _TIMED),
                      bool(flags & _PER_ITEM_CLOCK), budget), items
