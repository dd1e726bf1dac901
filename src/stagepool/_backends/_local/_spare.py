"""A spare worker, forked and booted ahead of need, so that a killed or crashed worker's
replacement takes the next item at once.

Measured (``python -m benchmarks.startup --only respawn``, stage importing numpy + scipy, with
``preload=``): after a timeout kill, the template's fork of the replacement took 3.5-13 ms and
the child's boot (its worker set-up, the first task's function) another 3-15 ms, against 6-9 ms
for a whole bare fork: the pool paid both after the deadline. A spare pays them beforehand; the
deadline is then followed only by the kill decision and one pipe write.

A spare is kept once a worker may be killed or has died: after the first task with a time limit
is dispatched, or the first kill or crash (the pool sets ``wanted``). Only where workers are
forked from the template (a fork of a warm process is cheap; a fresh interpreter is not worth
keeping idle). A spare that dies on its own (its initializer crashed, say) is reaped and not
replaced: replacements are then started as before, where a failing start-up is counted.
"""

from __future__ import annotations

from collections.abc import Callable

from ._lanes import Lane

__all__ = ["Spare"]


class Spare:
    """At most one idle, booted worker outside the crew's lanes (only the pool thread uses it)."""

    def __init__(self, fork: Callable[[], Lane], reap: Callable[[Lane], None]) -> None:
        self._fork, self._reap = fork, reap
        self.lane: Lane | None = None
        self.wanted = False
        self._failed = False

    def take(self) -> Lane | None:
        """The spare, now the caller's lane, if one is alive (else None)."""
        lane, self.lane = self.lane, None
        if lane is not None and lane.process.exitcode is not None:
            self._died(lane)
            return None
        return lane

    def refill(self, can_fork: bool) -> None:
        """Fork a new spare if one is wanted and missing (after the dispatch: the fork takes a
        few milliseconds of the pool thread)."""
        if can_fork and self.wanted and self.lane is None and not self._failed:
            self.lane = self._fork()

    def event(self, what: str) -> None:
        """The spare's stderr has output, or its process ended."""
        lane = self.lane
        if lane is None:
            return
        if what == "stderr":
            lane.forward_stderr()
        else:
            self.lane = None
            self._died(lane)

    def close(self) -> Lane | None:
        """The spare to stop (the crew kills it with the others), if any."""
        lane, self.lane = self.lane, None
        self.wanted = False
        return lane

    def _died(self, lane: Lane) -> None:
        self._failed = True
        self._reap(lane)
