"""``mem_per_task`` on a cluster (pure): how many of our chunks a dask worker may run at once.

A chunk runs one item at a time in one lane, so it needs ``mem_per_task``. A worker that declares
the ``MEMORY`` resource (``dask worker --resources "MEMORY=8e9"``, in bytes; the in-process
cluster declares its share of the machine's memory) gets its threads' worth of chunks, fewer if
its MEMORY does not hold that many, and each chunk asks dask for ``mem_per_task`` of it, so that
dask too keeps other clients' tasks from overcommitting that memory. A worker that declares no
MEMORY is sized by its ``memory_limit`` instead (dask's own cap on the worker process), and the
engine's plan says so. A worker that holds no chunk at all gets none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..._config import format_size

__all__ = ["MEMORY", "Capacity", "capacity", "describe"]

# The resource name, as dask's documentation spells its own example ("GPU=2 MEMORY=100e9").
MEMORY = "MEMORY"


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """One worker's share of our chunks: ``slots`` at once, ``by`` what decided it, the
    ``memory`` it declares (bytes, 0: none), and the resources each chunk asks dask for there
    (None: nothing to ask, the worker declares no MEMORY)."""

    slots: int
    by: str  # "threads", "MEMORY resource" or "memory_limit"
    memory: int = 0
    resources: dict[str, float] | None = None


def capacity(threads: int, resources: Mapping[str, float], memory_limit: int | None,
             mem_per_task: int | None) -> Capacity:
    """How many chunks of ``mem_per_task`` bytes a worker with ``threads``, these declared
    ``resources`` and this ``memory_limit`` (0 or None: unlimited) may run at once; may be 0."""
    if mem_per_task is None:
        return Capacity(threads, "threads")
    if MEMORY in resources:
        memory = int(resources[MEMORY])
        return Capacity(min(threads, memory // mem_per_task), "MEMORY resource", memory,
                        {MEMORY: float(mem_per_task)})
    if memory_limit:
        return Capacity(min(threads, memory_limit // mem_per_task), "memory_limit", memory_limit)
    return Capacity(threads, "threads")


def describe(capacities: list[tuple[int, Capacity]], mem_per_task: int | None) -> str:
    """What ``mem_per_task`` did to the cluster's threads, for the engine's plan: "" when nothing
    (no ``mem_per_task``, or every thread fits); ``capacities`` is (threads, capacity) per worker."""
    if mem_per_task is None:
        return ""
    threads = sum(t for t, _ in capacities)
    slots = sum(c.slots for _, c in capacities)
    by = sorted({c.by for _, c in capacities if c.by != "threads"})
    if not by:
        return f"; mem_per_task={format_size(mem_per_task)}: workers declare no memory to check"
    limited = "limited by memory, " if slots < threads else ""
    undeclared = (" (no MEMORY resource declared: sized by memory_limit)"
                  if "memory_limit" in by else "")
    return (f"; {limited}mem_per_task={format_size(mem_per_task)} fits {slots} of the {threads} "
            f"threads by the workers' {' and '.join(by)}{undeclared}")
