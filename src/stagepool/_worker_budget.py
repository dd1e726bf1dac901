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

While chunks keep coming the thread wakes once a budget (``LINGER_SECONDS``), not at each arm.

Emptying the list is how a forked child's loop already ends (``_worker_guards.mark_forked``): the
item that is running finishes (a value or an error, never cut in the middle) and the items the
iterator had not reached never start, so the answer holds a prefix of the chunk, as with a
clock check. The overrun is the running item plus the wait for the GIL: at most the
interpreter's switch interval (5 ms) while an item runs Python code, none while it waits or runs
C code that releases the GIL. The loop itself pays nothing per item.

Only a list the worker owns may be armed (the chunk's decoded items): clearing is the stop.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

__all__ = ["arm", "disarm"]


# After its last armed chunk the thread keeps waking every budget for this long, so that a
# chunk armed meanwhile needs no wake-up call: a wake-up is a thread that wants the GIL while
# the tiny loop holds it (a forced switch; on a loaded 2-core machine the loop then waits for
# the thread to be scheduled). Woken at each arm, maps of 20,000 x (x * 2) ran 4-7% slower than
# with clock reads between blocks of items; lingering, 2-8% faster (paired, load 2.4-3.9). On a
# worker that waits for work a wake-up is only a context switch.
LINGER_SECONDS = 1.0


class _Timer:
    """One daemon thread per process, started at the first armed chunk."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: tuple[list[Any], float] | None = None  # the chunk's items, when to stop
        self._last = 0.0  # when a chunk was last armed (time.perf_counter)
        self._step = math.inf  # the shortest budget armed so far: the lingering thread's beat
        self._wake_at = math.inf  # when the thread wakes next, unless told (inf: it waits)
        self._thread: threading.Thread | None = None

    def arm(self, items: list[Any], stop: float) -> None:
        armed = self._armed
        if armed is not None and armed[0] is items and armed[1] == stop:
            return  # re-entered after an item's error: already armed
        now = time.perf_counter()
        with self._cond:
            self._armed, self._last = (items, stop), now
            self._step = min(self._step, max(stop - now, 1e-3))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stagepool-budget",
                                                daemon=True)
                self._thread.start()
            elif stop < self._wake_at:  # it would wake too late: wake it now
                self._cond.notify()

    def disarm(self) -> None:
        # No lock: a plain store, so that a child forked by an item while the thread held the
        # lock cannot block here. A race with the thread only empties a finished chunk's list.
        self._armed = None

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.perf_counter()
                armed = self._armed
                if armed is not None and armed[1] <= now:
                    armed[0].clear()  # the loop ends after the running item
                    if self._armed is armed:
                        self._armed = None
                    continue
                if armed is not None:
                    self._wake_at = armed[1]
                elif now - self._last < LINGER_SECONDS:
                    self._wake_at = now + self._step
                else:
                    self._wake_at = math.inf
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


_timer = _Timer()
arm = _timer.arm
disarm = _timer.disarm
