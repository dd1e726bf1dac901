"""Ordered streaming's bound on how far a batch may run ahead of its consumer.

Outcomes held for reordering count against the in-flight window too: without it, one slow
chunk would let the chunks after it run (and their outcomes pile up, waiting) without bound.
"""

from __future__ import annotations

from collections import deque

__all__ = ["OrderWindow"]


class OrderWindow:
    """The starts of the source chunks taken and not yet fully emitted."""

    def __init__(self) -> None:
        self._starts: deque[int] = deque()

    def took(self, start: int) -> None:
        self._starts.append(start)

    def open(self, emitted: int, taken: int, size: int) -> bool:
        """Whether one more chunk may be taken, ``emitted`` items having reached the consumer
        in order out of ``taken``, with at most ``size`` chunks not yet fully emitted."""
        starts = self._starts
        while len(starts) > 1 and starts[1] <= emitted:
            starts.popleft()
        if starts and emitted >= taken:
            starts.clear()
        return len(starts) < size
