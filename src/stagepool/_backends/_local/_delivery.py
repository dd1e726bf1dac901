"""Handing a task its answer, or asking whether it still starts: the tasks' own callbacks, run
by the pool thread, which a faulty callback must never take down."""

from __future__ import annotations

import sys
import traceback

from .._protocol import Cancelled, Task, TaskResult

__all__ = ["notify", "starts"]


def notify(task: Task, result: TaskResult) -> None:
    """Deliver a result; a faulty callback must never take the pool thread down with it. Not
    even a BaseException: a future's done-callbacks run inside ``on_done``, and one that calls
    ``sys.exit()`` would end the pool thread without a word, leaving every later call waiting.

    The input segments of ``task.items`` are the callback's to free (see ``Task``)."""
    try:
        task.on_done(task, result)
    except BaseException:  # reported, not fatal
        print("stagepool: a task's completion callback raised (ignored):", file=sys.stderr)
        traceback.print_exc()


def starts(task: Task) -> bool:
    """Ask the task's ``on_start`` whether it still goes; if not (or if the hook raises: that
    fails this task only, never the pool thread), answer it ``Cancelled``."""
    if task.on_start is None:
        return True
    try:
        if task.on_start(task):
            return True
        result = Cancelled("future cancelled")
    except BaseException as exc:
        result = Cancelled(f"its start hook raised {type(exc).__name__}: {exc}", exc)
    notify(task, result)
    return False
