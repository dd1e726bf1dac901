"""Fair share between groups: which queued task an idle (or prefetching) worker takes next.

Pure bookkeeping, no processes: every batch (and the engine's single submits) is a
:class:`Group` with a queue of tasks. The group with the least estimated work served so far
goes next (a chunk-by-chunk turn would favour the batch whose chunks are bigger), and a group
that arrives starts level with the least-served one, so it shares the workers at once instead
of taking them all until it has "caught up". Thread-safe: the engine's threads queue, the
backend's thread takes. Shared by the backends that keep their own queue (local, dask).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ._protocol import Group, Task

__all__ = ["UNKNOWN_CHUNK_SECONDS", "FairShare"]

# What a chunk of unknown duration counts for in the fair share (a batch's first chunks).
UNKNOWN_CHUNK_SECONDS = 0.01


class FairShare:
    """Queued tasks by group, taken by least work served."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: collections.OrderedDict[Group, collections.deque[Task]] = (
            collections.OrderedDict())

    def __bool__(self) -> bool:
        return bool(self._pending)

    def queue_locked(self, task: Task, *, front: bool = False) -> bool:
        """Queue a task in its group (the caller holds ``lock``); False if the group has been
        withdrawn: ``withdraw`` may already have emptied its queue, so it would never run."""
        if task.group.cancelled:
            return False
        queue = self._pending.get(task.group)
        if queue is None:
            queue = self._pending[task.group] = collections.deque()
            task.group.served = max(task.group.served, min(
                (g.served for g in self._pending if g is not task.group), default=0.0))
        if front:
            queue.appendleft(task)
        else:
            queue.append(task)
        return True

    def queue(self, tasks: list[Task], *, front: bool = False) -> list[Task]:
        """Queue tasks (``front``: ahead of their group's others, in the given order); return
        those refused because their group was withdrawn."""
        with self.lock:
            ordered = reversed(tasks) if front else tasks
            return [task for task in ordered if not self.queue_locked(task, front=front)]

    def take(self, can_take: Callable[[Task], bool]) -> Task | None:
        """The next task for a worker (``can_take`` says which it accepts), or None."""
        with self.lock:
            best: Group | None = None
            for group, queue in self._pending.items():
                if group.cancelled:  # withdrawn a moment ago: its withdraw answers it
                    continue
                if queue and can_take(queue[0]) and (best is None or group.served < best.served):
                    best = group
            if best is None:
                return None
            queue = self._pending[best]
            task = queue.popleft()
            if not queue:
                del self._pending[best]
            best.served += task.expected if task.expected is not None else UNKNOWN_CHUNK_SECONDS
            return task

    def take_more(self, group: Group, accept: Callable[[Task], bool], limit: int) -> list[Task]:
        """Up to ``limit`` more tasks from the front of ``group``'s queue, while ``accept`` says
        yes (to travel with a task just taken from it)."""
        taken: list[Task] = []
        with self.lock:
            queue = self._pending.get(group)
            while queue and len(taken) < limit and accept(queue[0]):
                task = queue.popleft()
                group.served += task.expected or 0.0
                taken.append(task)
            if queue is not None and not queue:
                del self._pending[group]
        return taken

    def queued(self, group: Group) -> int:
        """How many tasks of ``group`` wait."""
        queue = self._pending.get(group)
        return 0 if queue is None else len(queue)

    def withdraw(self, group: Group) -> list[Task]:
        """Every queued task of ``group``, taken out."""
        with self.lock:
            return list(self._pending.pop(group, ()))

    def withdraw_task(self, task: Task) -> bool:
        """Take one task out if it is still queued."""
        with self.lock:
            queue = self._pending.get(task.group)
            if queue is None or task not in queue:  # Task compares by identity
                return False
            queue.remove(task)
            if not queue:
                del self._pending[task.group]
            return True

    def drain(self) -> list[Task]:
        """Every queued task, taken out."""
        with self.lock:
            tasks = [t for q in self._pending.values() for t in q]
            self._pending.clear()
            return tasks
