"""Handing a task its answer, or asking whether it still starts: the tasks' own callbacks, run
by the pool thread, which a faulty callback must never take down."""

from __future__ import annotations

from .._protocol import Cancelled, Task, notify

__all__ = ["notify", "starts"]


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
