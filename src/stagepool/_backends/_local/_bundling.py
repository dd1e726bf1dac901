"""Short single calls travel together: one message, one answer and one wake-up of the worker
for several calls.

Each call is otherwise its own round trip: a write and two reads in the pool thread, two reads
and a write in the worker, and a poll turn, each a hand-off of the GIL and a scheduling delay on a
busy machine. When more calls of a bundling group (the engine's single submits) wait than the
workers can take one by one, the pool thread takes several at once, starts each (a cancelled one
drops out here, as it would alone), and the group merges them into one task
(``Bundler.merge``). Blame stays exact: the worker records which item of the bundle it is
running, so a death or a timeout names one call, and the calls that did not finish run again
alone.

Only calls expected to be short travel together (a learnt duration under
``PREFETCH_MAX_SECONDS``, the same bound as prefetching onto a busy worker), and the whole
bundle stays under that bound and ``PREFETCH_MAX_BYTES``: a bundle never holds a worker much
longer than one call would, so another batch's turn is not delayed, and other workers keep
their share of the queue.
"""

from __future__ import annotations

from .._fairshare import FairShare
from .._protocol import Task
from ._delivery import starts
from ._lanes import PREFETCH_MAX_BYTES, PREFETCH_MAX_SECONDS

__all__ = ["MAX_BUNDLE", "bundled"]

# Calls in one bundle at most: past ~16 the per-call cost is already spread thin, and a longer
# bundle only delays the first of its answers.
MAX_BUNDLE = 16


def bundled(queue: FairShare, task: Task, workers: int, quota: int | None = None) -> Task:
    """``task`` (taken and started), with more of its group's waiting calls merged into it when
    its group bundles them; at most a ``workers``-th of those waiting, so that every worker gets
    its share, and no more than the worker's ``quota`` of items (``max_tasks_per_worker``: a
    worker recycled after each call must still run one call each)."""
    bundler = task.group.bundler
    if bundler is None or not bundler.accepts(task) or not _short(task):
        return task
    limit = min(MAX_BUNDLE - 1, queue.queued(task.group) // max(workers, 1))
    if quota is not None:
        limit = min(limit, quota - task.n_items)
    if limit <= 0:
        return task
    room = [PREFETCH_MAX_SECONDS - (task.expected or 0.0), PREFETCH_MAX_BYTES - len(task.items)]

    def fits(more: Task) -> bool:
        if not (_short(more) and bundler.accepts(more)):
            return False
        room[0] -= more.expected or 0.0
        room[1] -= len(more.items)
        return room[0] > 0 and room[1] > 0

    members = [task, *(t for t in queue.take_more(task.group, fits, limit) if starts(t))]
    return task if len(members) == 1 else bundler.merge(members)


def _short(task: Task) -> bool:
    return (task.expected is not None and task.expected < PREFETCH_MAX_SECONDS
            and isinstance(task.items, bytes))
