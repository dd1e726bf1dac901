"""Where a batch's answers wait for the batch thread: handed over by backend threads, taken in
bursts.

Each hand-off to a sleeping thread is a wake-up, and on a loaded machine a thread that wakes may
wait a whole time slice for a CPU, holding up the pool thread while it holds the GIL. A batch
that has nothing to send until its chunks come back (a ``map`` whose rest went out at once)
therefore sleeps until *all* of them are back, not one wake-up per answer, as
``multiprocessing.Pool.map`` waits once. An urgent answer (a worker died, a chunk was cancelled:
something may have to go out again) and the batch's own wake-up end the wait at once.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

__all__ = ["Mailslot"]

T = TypeVar("T")


class Mailslot(Generic[T]):
    """A queue whose taker may ask to sleep until ``wanted`` items are there."""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        # Re-entrant: a garbage collector's finalizer may run inside put() and put again.
        self._ready = threading.Condition(threading.RLock())
        self._wanted = 1

    def put(self, item: T, *, urgent: bool = False) -> None:
        """From any thread; wakes the taker when it has what it asked for, or ``urgent``."""
        with self._ready:
            self._items.append(item)
            if urgent or len(self._items) >= self._wanted:
                self._ready.notify()

    def take(self, timeout: float, wanted: int = 1) -> list[T]:
        """Every item there, after waiting at most ``timeout`` seconds for ``wanted`` of them (or
        an urgent one); maybe none. Cancellation: a ``KeyboardInterrupt`` ends the wait and
        propagates, the items stay for the next take."""
        with self._ready:
            if len(self._items) < wanted and timeout > 0:
                self._wanted = max(1, wanted)
                try:
                    self._ready.wait(timeout)
                finally:
                    self._wanted = 1
            items = list(self._items)
            self._items.clear()
        return items
