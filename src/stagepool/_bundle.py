"""The engine's side of bundled single calls: merging started calls into one task, and handing
each call its own share of the bundle's answer (``_backends/_local/_bundling`` says when).

    calls' tasks (each: one pickled call, started) --merge--> one task, items = their pickles
    bundle answer (one ChunkResult) --split--> each call's on_done(one-item ChunkResult)
    worker died on item k --> call k: on_done(death, offset 0); every other call: queued again
                              alone (it did not finish, or its result died with the worker)

A call whose result was lost with the worker runs again: ``Engine.submit`` promises one outcome
per call, and a bundle must not turn one call's crash into another's failure.
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any

from ._backends import Backend, Cancelled, Group, LaneDied, Task, TaskResult, notify
from ._call_blobs import NO_SEGMENTS, apply_blob, pack_blobs
from ._failures import KILLED_BY
from ._worker import ChunkResult

__all__ = ["CallBundler"]

_NO_LIMIT = float("inf")


class CallBundler:
    """Merges one group's single-call tasks (see ``Bundler``): tasks of the function keyed
    ``call_key`` (``apply_call``: not a bundle, which may be requeued after its worker died)
    whose items are one segment-free pickle (big arrays travel alone, through shared memory)."""

    def __init__(self, backend: Backend, call_key: int) -> None:
        self.backend, self._call_key = backend, call_key
        self.group = Group(self)
        self._fn = backend.codec.function(apply_blob)

    def accepts(self, task: Task) -> bool:
        items = task.items
        return (task.fn_key == self._call_key and task.n_items == 1 and isinstance(items, bytes)
                and items.startswith(NO_SEGMENTS))

    def merge(self, tasks: list[Task]) -> Task:
        key, fn_form = self._fn
        limits = None
        if any(t.timeouts is not None for t in tasks):
            limits = tuple(t.timeouts[0] if t.timeouts is not None else _NO_LIMIT for t in tasks)
        expected = sum(t.expected or 0.0 for t in tasks)
        return Task(self.group, key, fn_form, pack_blobs([t.items for t in tasks]), len(tasks),
                    lambda bundle, result: self._answer(tasks, result), limits, expected)

    def _answer(self, members: list[Task], result: TaskResult) -> None:
        """In the backend's thread, once: each member gets its answer (or goes back in the
        queue); a member's failing callback does not keep the others from theirs."""
        if isinstance(result, Cancelled):
            shares: list[Any] = [result] * len(members)
        elif isinstance(result, LaneDied) and result.reason in KILLED_BY:
            shares = _killed_shares(result, len(members))
        elif isinstance(result, LaneDied):
            self._requeue([m for i, m in enumerate(members) if i != result.offset])
            shares = [dataclasses.replace(result, offset=0, ran=0) if i == result.offset else None
                      for i in range(len(members))]
        else:
            shares = self._split(result, len(members))
        for member, share in zip(members, shares, strict=True):
            if share is not None:
                notify(member, share)

    def _split(self, result: TaskResult, n: int) -> list[Any]:
        try:
            values, stamps, errors, pid = self.backend.codec.decode(result)
        except Exception as exc:  # each call reports it as its result's unpickling failure
            return [exc] * n
        return [ChunkResult([values[i]], array("d", stamps[i:i + 2]),
                            {0: errors[i]} if errors and i in errors else None, pid)
                for i in range(n)]

    def _requeue(self, members: list[Task]) -> None:
        """Calls that did not finish in a bundle whose worker died go back in the queue, alone
        (``expected`` unknown: never bundled or prefetched again) so a second death names one."""
        for member in members:
            member.expected = None
        try:
            self.backend.submit_many(members)
        except BaseException as exc:  # the engine is closing: they never run
            for member in members:
                notify(member, Cancelled("the engine was shut down", exc))


def _killed_shares(died: LaneDied, n: int) -> list[TaskResult]:
    """A bundle killed by us (its batch cancelled, ``shutdown(kill=True)``): nothing runs again.
    The calls that finished lost their results (``ran=1``, no offset), the running one was
    killed, the rest never started (``Cancelled``)."""
    ran = died.offset if died.offset >= 0 else (died.ran or 0)
    return [dataclasses.replace(died, offset=-1, ran=1) if i < ran else
            dataclasses.replace(died, offset=0, ran=0) if i == died.offset else
            Cancelled(f"{KILLED_BY[died.reason]}; it never started") for i in range(n)]
