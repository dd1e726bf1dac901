"""Backends run chunk tasks somewhere: local worker processes, in-process, or a dask cluster.

The engine speaks to a backend only through :class:`Backend`, its :class:`Codec` and the small
value classes below. A backend never imports the engine, the asyncio bridge or progress; it
reports facts (this task's answer, or "its worker died while on item 3", or "... on an item I
cannot name") and the engine decides what they mean.

What differs between places is declared, not guessed: :class:`Capabilities` says whether the
backend can name the item a dead worker was running (if not, the engine bisects the chunk),
survive a crashing item, stop a running item at its timeout, or move arrays through shared memory.
"""

from __future__ import annotations

from typing import Any

from ._protocol import (
    Backend,
    BackendName,
    BackendOptions,
    Bundler,
    Cancelled,
    Capabilities,
    Codec,
    DeathReason,
    Encoded,
    Group,
    LaneDied,
    LaneState,
    OverBudget,
    Task,
    TaskResult,
    notify,
)

__all__ = [
    "DASK_HINT",
    "Backend",
    "BackendName",
    "BackendOptions",
    "Bundler",
    "Cancelled",
    "Capabilities",
    "Codec",
    "DeathReason",
    "Encoded",
    "Group",
    "LaneDied",
    "LaneState",
    "OverBudget",
    "Task",
    "TaskResult",
    "make_backend",
    "notify",
]


DASK_HINT = 'backend="dask" needs dask.distributed: pip install "stagepool[dask]"'


def make_backend(name: BackendName, options: BackendOptions, *, address: str | None = None,
                 client: Any = None) -> Backend:
    """Start the backend called ``name``; each is imported only when asked for.

    ``"dask"`` connects to ``address`` or uses ``client`` (else starts an in-process cluster) and
    hosts a local backend on each dask worker; raises ``ImportError`` with the install command
    when dask.distributed is missing."""
    if name == "serial":
        from ._serial import SerialBackend

        return SerialBackend(options)
    from ._local import LocalBackend

    if name == "dask":
        try:
            from ._dask import DaskBackend
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in ("dask", "distributed"):
                raise
            raise ImportError(DASK_HINT) from exc
        # The hosted backend is handed in, not imported there: the backends stay independent.
        return DaskBackend(options, hosted=LocalBackend, address=address, client=client)
    return LocalBackend(options)
