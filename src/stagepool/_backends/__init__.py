"""Backends run chunk tasks somewhere: local worker processes, in-process, or (later) a cluster.

The engine speaks to a backend only through :class:`Backend`, its :class:`Codec` and the small
value classes below. A backend never imports the engine, the asyncio bridge or progress; it
reports facts (this task's answer, or "its worker died while on item 3", or "... on an item I
cannot name") and the engine decides what they mean.

What differs between places is declared, not guessed: :class:`Capabilities` says whether the
backend can name the item a dead worker was running (if not, the engine bisects the chunk),
survive a crashing item, stop a running item at its timeout, or move arrays through shared memory.
"""

from __future__ import annotations

from ._protocol import (
    Backend,
    BackendName,
    BackendOptions,
    Cancelled,
    Capabilities,
    Codec,
    DeathReason,
    Encoded,
    Group,
    LaneDied,
    Task,
    TaskResult,
)

__all__ = [
    "Backend",
    "BackendName",
    "BackendOptions",
    "Cancelled",
    "Capabilities",
    "Codec",
    "DeathReason",
    "Encoded",
    "Group",
    "LaneDied",
    "Task",
    "TaskResult",
    "make_backend",
]


def make_backend(name: BackendName, options: BackendOptions) -> Backend:
    """Start the backend called ``name``; each is imported only when asked for."""
    if name == "serial":
        from ._serial import SerialBackend

        return SerialBackend(options)
    from ._local import LocalBackend

    return LocalBackend(options)
