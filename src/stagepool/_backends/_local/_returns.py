"""What comes back from a worker: an answer, or its death (the pool thread's side of a lane).

An answer goes to its task (the first the lane holds) and may retire the worker (grown past
``max_rss``, or ``max_tasks`` items done). A death is buried: the answers it sent before dying
still count, the results it made but never sent are freed, the item it was running is blamed
(from the shared record, through the crew's autopsy), the tasks it had not started go back to
the front of the queue, and a replacement starts (unless one started when it was told to die).
A worker that died in the initializer fails every task, queued or yet to come, with that death.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ... import _shm
from ..._resources import rss_of
from .._fairshare import FairShare
from .._protocol import Cancelled, DeathReason, LaneDied, Task
from ._crew import Crew
from ._delivery import notify
from ._lanes import Lane, readable

__all__ = ["Returns"]


class Returns:
    """Reads answers and buries deaths for one pool; ``init_died`` once the initializer killed a
    worker (then nothing respawns and every task gets that answer)."""

    def __init__(self, crew: Crew, queue: FairShare, retire: Callable[[Lane], None], *,
                 max_rss: int | None, max_tasks: int | None, initializer: Any) -> None:
        self._crew, self._queue, self._retire = crew, queue, retire
        self._max_rss, self._max_tasks, self._initializer = max_rss, max_tasks, initializer
        self.init_died: LaneDied | None = None

    def receive(self, lane: Lane, *, respawn: bool) -> None:
        if not self._receive_one(lane):
            lane.process.join(1.0)  # it is dying: let the sentinel path account for it
            self.bury(lane, respawn=respawn)

    def _receive_one(self, lane: Lane, *, dying: bool = False) -> bool:
        """Take one answer from a worker; False when its pipe is broken (the worker is dying)."""
        try:
            blob = lane.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        _shm.claim(blob)  # ours now: a sweep after this worker's death must not free it
        task = lane.tasks.popleft()
        lane.items_done += task.n_items
        if lane.quota is not None:
            lane.quota -= task.n_items
        lane.answered = True
        self._crew.startup_failures = 0
        notify(task, blob)
        if self._max_rss is not None and (rss_of(lane.pid) or 0) > self._max_rss:
            lane.retiring = True  # grew past the cap between items: recycle it
        if self._max_tasks is not None and lane.items_done >= self._max_tasks:
            lane.retiring = True
        if lane.retiring and not lane.tasks and not dying:
            self._retire(lane)
        return True

    def bury(self, lane: Lane, *, respawn: bool) -> None:
        """A worker died: blame the item it was running, requeue what it had not started;
        ``respawn`` is False while the pool kills everything (a graceful shutdown still owes
        the requeued tasks an answer, so it respawns)."""
        self._crew.collect(lane)
        while lane.tasks and readable(lane.conn):  # answers it sent before dying still count
            if not self._receive_one(lane, dying=True):
                break
        _shm.sweep(os.getpid(), f"w{lane.pid}")  # results it made but never sent
        dead = self._crew.autopsy(lane)
        if dead.in_init:
            self._fail_initializer(lane, dead.tasks)
            self._crew.release(lane)
            return
        self._crew.release(lane)
        requeue = dead.tasks[1:] if dead.died is not None else dead.tasks
        for task in self._queue.queue(requeue, front=True):
            notify(task, Cancelled("batch cancelled"))
        if dead.died is not None:
            notify(dead.tasks[0], dead.died)
        if respawn and not lane.replaced:
            self._respawn_after_death()

    def _fail_initializer(self, lane: Lane, tasks: list[Task]) -> None:
        """The worker died in the initializer (segfault, os._exit): a new one would most likely
        die the same way, so none is started, and every task, queued or yet to come, is answered
        with this death (the pool's dispatch), as when the initializer raises."""
        if self.init_died is None:
            name = getattr(self._initializer, "__qualname__", repr(self._initializer))
            module = getattr(self._initializer, "__module__", None)
            reason: DeathReason = lane.kill_reason or "initializer"  # died in it, or hung there
            self.init_died = LaneDied(
                lane.pid, lane.process.exitcode, -1, reason, lane.last_words(), ran=0,
                initializer=f"{module}.{name}" if module else name)
        for task in tasks:
            notify(task, self.init_died)

    def _respawn_after_death(self) -> None:
        if self._crew.gave_up_starting():
            # Workers die before doing anything: fail the queue instead of respawning forever.
            for task in self._queue.drain():
                notify(task, LaneDied(0, None, -1, "crash",
                                      "workers keep dying at start-up; see stderr", ran=0))
        self._crew.respawn()
