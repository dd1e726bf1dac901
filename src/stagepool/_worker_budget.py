"""The time budget of a chunk of tiny items, kept by a thread of the worker (issue 15).

A budgeted chunk of tiny items must stop between two items once it has run its budget (the
parent then sends the unstarted rest again), yet a clock read per item costs as much as the item
itself. Looking at the clock between blocks of items does not bound the overrun: when items turn
slow inside a block (3,000 tiny items, then 300 of 10 ms), the whole block runs on one worker
(3 s against 1.5 s). So nothing in the item loop looks at the time; a timer thread does:

    run_chunk --arm(items, stop)--> [budget thread] waits until ``stop`` (Condition.wait)
        |  loop: for offset, item in enumerate(items)      |
        |                                                   at ``stop``: items.clear()
        v  the list iterator ends after the running item <--/
    disarm() when the loop ended: a late ``clear`` then only empties a finished chunk's list

Emptying the list is how a forked child's loop already ends (``_worker_guards.mark_forked``): the
item that is running finishes (a value or an error, never cut in the middle) and the items the
iterator had not reached never start, so the answer holds a prefix of the chunk, as with a
clock check. The overrun is the running item plus the wait for the GIL: at most the
interpreter's switch interval (5 ms) while an item runs Python code, none while it waits or runs
C code that releases the GIL. The loop itself pays nothing per item.

Only a list the worker owns may be armed (the chunk's decoded items): clearing is the stop.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["arm", "disarm"]


class _Timer:
    """One daemon thread per process, started at the first armed chunk."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: list[Any] | None = None  # the armed chunk's items
        self._stop = 0.0  # when to empty them (time.perf_counter)
        self._thread: threading.Thread | None = None

    def arm(self, items: list[Any], stop: float) -> None:
        if self._items is items and self._stop == stop:
            return  # re-entered after an item's error: already armed
        with self._cond:
            self._items, self._stop = items, stop
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stagepool-budget",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        # No lock: a plain store, so that a child forked by an item while the thread held the
        # lock cannot block here. A race with the thread only empties a finished chunk's list.
        self._items = None

    def _run(self) -> None:
        with self._cond:
            while True:
                items = self._items
                if items is None:
                    self._cond.wait()
                    continue
                left = self._stop - time.perf_counter()
                if left > 0:
                    self._cond.wait(left)
                    continue
                items.clear()  # the loop ends after the running item
                if self._items is items:
                    self._items = None


_timer = _Timer()
arm = _timer.arm
disarm = _timer.disarm
