"""The cluster's workers as the dispatcher sees them: who is there, how many of our chunks each
may run at once (its threads, fewer if ``mem_per_task`` says so: see ``_memory``), how many it
runs now, and whether it takes new ones (a paused or retiring worker does not).

Only the dispatcher thread uses a ``Roster``; ``refresh`` is one scheduler RPC, bounded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..._config import format_size
from ..._planning import count_of
from . import _cluster, _versions
from ._memory import Capacity, capacity, describe

__all__ = ["AHEAD", "Member", "Roster"]

# Chunks sent to a worker beyond those it can run at once, per slot: each waits in the worker's
# own queue and starts the moment a running one ends. Without it, a slot idled for a full round
# trip after every chunk (the answer's way back to us, then the next chunk's way to the worker:
# ~30 ms here, 22% of a 200 x 20 ms batch on a 2-worker LocalCluster). Dask starts a worker's
# ready tasks in submission order, so when a worker dies, its oldest ``slots`` chunks that had not
# ended are the ones that may have been running, and the rest had not started (see
# ``Flights._end``; a chunk's end is recorded with the scheduler before the one behind it starts).
AHEAD = 1


@dataclasses.dataclass(eq=False, slots=True)
class Member:
    """A dask worker: its threads, its share of our chunks, and how many of them it runs."""

    address: str
    threads: int
    pid: int
    capacity: Capacity
    busy: int = 0
    accepting: bool = True  # its status is "running": not paused, not being retired
    gone: bool = False  # it died or left: never chosen again, even before the scheduler says so

    @property
    def free(self) -> int:
        """Chunks it may take now (its slots, and AHEAD more to wait in its queue)."""
        if self.gone or not self.accepting:
            return 0
        # A chunk waits ahead only where it cannot start beside the running ones: the worker
        # runs as many as it has threads, or dask holds it back for lack of the MEMORY resource
        # (a worker sized by memory_limit alone would start it on a spare thread at once).
        waits = self.capacity.slots >= self.threads or self.capacity.resources is not None
        return self.capacity.slots * (1 + (AHEAD if waits else 0)) - self.busy


class Roster:
    """The workers of one client's cluster, followed by ``refresh``."""

    def __init__(self, client: Any, mem_per_task: int | None, *,
                 refused: dict[str, str] | None = None, vet: bool = False) -> None:
        self._client = client
        self._mem_per_task = mem_per_task
        self.members: dict[str, Member] = {}
        # Workers of another stagepool version, by address: why each gets nothing (``_versions``).
        # Asked of each worker as it joins when ``vet``; else only read (a roster of a moment
        # shares the dispatcher's: membership tests only, safe across threads).
        self.refused = {} if refused is None else refused
        self._vet = vet

    def refresh(self) -> list[Member]:
        """Ask the scheduler who is there: add the workers that joined, drop and return the ones
        that left (with their ``busy`` count as it was). An unreachable scheduler changes
        nothing (look again next time)."""
        try:
            info = _cluster.workers_info(self._client)
        except Exception:
            return []
        return self.update(info)

    def update(self, info: dict[str, dict[str, Any]]) -> list[Member]:
        """Follow ``info`` (the scheduler's view, see ``refresh``); return the members that left."""
        left = [self.members.pop(address) for address in list(self.members)
                if address not in info]
        if self._vet:
            info = self._vetted(info)
        for address, facts in info.items():
            if address in self.refused:
                continue
            member = self.members.get(address)
            if member is None:
                member = self.members[address] = self._member(address, facts)
            member.accepting = facts.get("status", "running") == "running"
        return left

    def _vetted(self, info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``info`` without the workers that joined and could not be asked their version (the
        scheduler did not answer: asked again next time); refuses those of another version."""
        for address in [a for a in self.refused if a not in info]:  # gone: a new one may come
            del self.refused[address]
        new = [a for a in info if a not in self.members and a not in self.refused]
        if not new:
            return info
        try:
            others = _versions.mismatched(self._client, new)
        except Exception:
            return {a: facts for a, facts in info.items() if a not in new}
        for address, theirs in others.items():
            self.refused[address] = _versions.refusal(address, theirs)
        return info

    def _member(self, address: str, facts: dict[str, Any]) -> Member:
        threads = int(facts.get("nthreads") or 1)
        share = capacity(threads, facts.get("resources") or {},
                         int(facts.get("memory_limit") or 0), self._mem_per_task)
        return Member(address, threads, int(facts.get("pid") or 0), share)

    def free(self) -> Member | None:
        """The worker with the most room for a chunk, or None if every one is full."""
        best = max(self.members.values(), key=lambda m: m.free, default=None)
        return best if best is not None and best.free > 0 else None

    @property
    def slots(self) -> int:
        """Chunks the cluster may run at once (0 when no worker holds one)."""
        return sum(m.capacity.slots for m in self.members.values())

    def check_fits(self, address: str) -> None:
        """Raise ``ValueError`` when ``mem_per_task`` fits no worker, naming the largest."""
        if self.slots or self._mem_per_task is None or not self.members:
            return
        largest = max(m.capacity.memory for m in self.members.values())
        raise ValueError(
            f"mem_per_task={format_size(self._mem_per_task)} fits no worker of the dask cluster "
            f"at {address}: the most any declares is {format_size(largest)} (its MEMORY "
            f"resource, else its memory_limit); lower mem_per_task or start workers with more: "
            f"dask worker {address} --resources \"MEMORY={self._mem_per_task}\"")

    def __str__(self) -> str:
        members = list(self.members.values())
        threads = {m.threads for m in members}
        shape = count_of(len(members), "worker")
        if len(threads) == 1:
            shape += f" x {count_of(threads.pop(), 'thread')}"
        return shape + describe([(m.threads, m.capacity) for m in members], self._mem_per_task)

