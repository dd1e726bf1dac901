"""The worker processes' lifecycle: which lanes serve, which are leaving, which slots are free.

The pool thread (``_pool``) decides what to run and answers tasks; the crew starts, retires,
reaps, kills and replaces the workers it runs them on, and reads from the shared record what a
dead worker was doing. Only the pool thread calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._dumps import last_dump
from ..._resources import kill_group, kill_tree
from ..._worker import (
    OFFSET_FREEING,
    PHASE_ENCODE,
    PHASE_IDLE,
    PHASE_INIT,
    PHASE_RUN,
    WorkerSetup,
)
from ..._worker_stderr import STACK_SIGNAL
from .._protocol import DeathReason, Group, LaneDied, Task
from ._lanes import Lane, open_lane, start_lane
from ._record import SharedRecord, SlotState
from ._spare import Spare
from ._template import ForkedProcess, Template, TemplateGone
from ._template import supported as template_supported

__all__ = ["STARTUP_FAILURE_LIMIT", "STOP_JOIN_TIMEOUT", "Autopsy", "Crew"]

# A worker that dies this many times in a row before finishing anything is not respawned blindly.
STARTUP_FAILURE_LIMIT = 3
STOP_JOIN_TIMEOUT = 5.0
# How long a hung worker gets to write its stack (STACK_SIGNAL) before it is killed: the dump is
# written by a signal handler at once; this only covers a busy machine's scheduling delay.
STACK_WAIT = 0.1
# The chunk a worker is killed for when it hung letting go of one it answered (no task's).
FREED_CHUNK = -2


@dataclasses.dataclass(frozen=True)
class Autopsy:
    """What a dead worker left: the tasks it held (the first was running if ``died`` is set),
    and whether it died in the initializer (then ``died`` is None: see ``_fail_initializer``)."""

    tasks: list[Task]
    in_init: bool
    died: LaneDied | None


def _stop(pid: int, grace: float, dump_stack: bool) -> None:
    """Kill a worker's process tree; with ``dump_stack``, first have it write its stack."""
    if dump_stack:
        with contextlib.suppress(OSError):
            os.kill(pid, STACK_SIGNAL)
        time.sleep(STACK_WAIT)
    kill_tree(pid, grace=grace)


def _start_template(env: dict[str, str], preload: tuple[str, ...]) -> Template | None:
    """The warm template, or None (workers then start with loky) where it cannot run."""
    if not template_supported():
        return None
    try:
        return Template(env, preload)
    except (OSError, TemplateGone) as exc:  # no interpreter (embedded Python), no fds, ...
        print(f"stagepool: cannot start the workers' template ({exc}); starting workers "
              "without it", file=sys.stderr)
        return None


def _ran(phase: int, offset: int, task: Task) -> int:
    """How many items of a dead worker's chunk had finished, from the phase it died in."""
    if phase == PHASE_RUN:
        return max(0, offset)
    return task.n_items if phase == PHASE_ENCODE else 0  # encoding results / still decoding


def _moved_on(lane: Lane, running: Task, phase: int, offset: int) -> LaneDied | None:
    """The death of a worker killed for a chunk that answered before the kill landed (its
    item overran its limit, then ended: the kill comes from a thread, milliseconds later on a
    loaded machine), while it ran ``running``, the chunk it already held; None if the kill was
    for ``running`` (or was no kill of ours). Nothing in ``running`` is to blame, and the
    offset of the verdict is not of it: its items that ran or were running go again
    ("lost"), the rest never started. Blaming that offset failed an innocent item, or raised
    IndexError out of map() in a shorter chunk."""
    if lane.kill_chunk in (-1, running.id):
        return None
    ran = _ran(phase, offset, running) + (phase == PHASE_RUN and offset >= 0)
    return LaneDied(lane.pid, lane.process.exitcode, -1, "lost",
                    f"was killed for its previous chunk ({lane.kill_reason})", ran=ran)


def _blamed(lane: Lane, running: Task, state: SlotState, detail: str) -> LaneDied:
    """The death of a worker on an item of ``running``: the item ``state`` names, or the one
    we killed it for. That one keeps the blame though the worker may move on before the kill
    lands (a thread sends it): the items it ran meanwhile ran (``ran`` past the blamed one;
    they said one attempt where they ran twice), and the blamed item's duration is unknown.
    A cancelled chunk's worker may start more items meanwhile: they ran too."""
    reason = lane.kill_reason or "crash"
    offset, ran, start = state.offset, _ran(state.phase, state.offset, running), state.start
    running_now = state.phase == PHASE_RUN
    if lane.kill_reason not in (None, "cancelled") and lane.kill_offset >= 0:
        if running_now and offset > lane.kill_offset:
            ran, start = offset + 1, math.inf  # the item it was on ran too
        offset = lane.kill_offset
    ended = lane.kill_at if lane.kill_at is not None else time.monotonic()
    return LaneDied(lane.pid, lane.process.exitcode, offset if running_now else -1, reason,
                    detail, ran=ran, duration=max(0.0, ended - start) if running_now else 0.0,
                    stack=last_dump(lane.hung_stack() if reason == "timeout" else detail))


class Crew:
    """The lanes serving (``lanes``) and leaving (``leaving``), and the record slots they use."""

    def __init__(self, ctx: Callable[[], Any], record: SharedRecord, setup: WorkerSetup,
                 env: dict[str, str], max_tasks: int | None, kill_grace: float, workers: int,
                 preload: tuple[str, ...] = (), *, template: bool = True) -> None:
        self._ctx, self._record, self._setup, self._env = ctx, record, setup, env
        self._max_tasks, self._kill_grace = max_tasks, kill_grace
        self._free_slots = list(range(4 * (workers + 1)))[::-1]
        self.startup_failures = 0
        # Workers told to stop (recycled, or the pool stopping), with the moment they get killed
        # if they have not exited: reaped when their sentinel fires, never waited for in a loop
        # that also feeds the others.
        self.leaving: dict[Lane, float] = {}
        self.lanes: list[Lane] = []
        self._template = _start_template(env, preload) if template else None
        self.spare = Spare(self._fork, self._reap_spare)

    def start(self, workers: int) -> None:
        """Start the first workers (in the pool thread: the constructor does not wait)."""
        for _ in range(workers):
            self.lanes.append(self.spawn())

    def watch(self) -> dict[Any, tuple[str, Lane]]:
        """What the pool thread waits on: each object with what it firing means, and its lane."""
        by_obj: dict[Any, tuple[str, Lane]] = {}
        for lane in self.lanes:
            by_obj[lane.process.sentinel] = ("died", lane)
            by_obj[lane.stderr] = ("stderr", lane)
            if lane.tasks:
                by_obj[lane.conn] = ("result", lane)
        for lane in self.leaving:
            by_obj[lane.process.sentinel] = ("left", lane)
            by_obj[lane.stderr] = ("stderr", lane)
        if self.spare.lane is not None:
            by_obj[self.spare.lane.process.sentinel] = ("spare-died", self.spare.lane)
            by_obj[self.spare.lane.stderr] = ("stderr", self.spare.lane)
        return by_obj

    def spawn(self) -> Lane:
        """A new worker's lane: the spare if one is ready (see ``_spare``), else a new fork."""
        return self.spare.take() or self._fork()

    def keep_spare(self, *, stopping: bool) -> None:
        self.spare.refill(not stopping and self._template is not None and bool(self._free_slots))

    def _reap_spare(self, lane: Lane) -> None:
        kill_tree(lane.pid, grace=0)
        lane.process.join(1.0)
        self.release(lane)

    def _fork(self) -> Lane:
        if not self._free_slots:  # every spare slot held by workers slow to leave: wait for one
            oldest = next(iter(self.leaving))
            if oldest.process.exitcode is None:
                oldest.process.join(max(0.0, self.leaving[oldest] - time.monotonic()))
                kill_tree(oldest.pid, grace=0)
            self.reap(oldest)
        slot = self._free_slots.pop()
        self._record.reset(slot)
        setup = dataclasses.replace(self._setup, slot=slot, ppid=os.getpid())
        if self._template is not None:
            try:
                return open_lane(slot, self._max_tasks, lambda conn, err: self._template_spawn(
                    setup, (conn.fileno(), err.fileno())), self._record)
            except TemplateGone as exc:
                print(f"stagepool: {exc}; starting workers without a template",
                      file=sys.stderr)
                self._close_template()
        return start_lane(self._ctx(), setup, self._env, self._max_tasks, self._record)

    def _template_spawn(self, setup: WorkerSetup, fds: tuple[int, int]) -> ForkedProcess:
        assert self._template is not None
        return self._template.spawn(setup, fds)

    def _close_template(self) -> None:
        template, self._template = self._template, None
        if template is not None:
            template.close()

    def release(self, lane: Lane) -> None:
        lane.close()
        self._free_slots.append(lane.slot)

    def retire(self, lane: Lane, *, replace: bool) -> None:
        """Tell a drained worker to stop and, with ``replace``, start a fresh one in its place at
        once; the old one is reaped when it has exited (killed if it takes longer than
        STOP_JOIN_TIMEOUT)."""
        with contextlib.suppress(OSError):
            lane.conn.send_bytes(b"")
        self.lanes.remove(lane)
        self.leaving[lane] = time.monotonic() + STOP_JOIN_TIMEOUT
        if replace:
            self.lanes.append(self.spawn())

    def reap(self, lane: Lane) -> None:
        """A leaving worker exited: collect it, pass on its last words, free its slot."""
        kill_group(lane.pid)  # what its items left running
        lane.process.join(1.0)
        lane.forward_stderr()
        del self.leaving[lane]
        self.release(lane)

    def expire_leaving(self) -> None:
        now = time.monotonic()
        for lane, deadline in list(self.leaving.items()):
            if now >= deadline and lane.process.exitcode is None:
                kill_tree(lane.pid, grace=0)  # its sentinel fires next turn: then reap
                self.leaving[lane] = float("inf")

    def kill(self, lane: Lane, reason: DeathReason, offset: int = -1, *,
             replace: bool = False) -> None:
        """Kill a worker (in a thread: the grace period must not stall the pool) and, with
        ``replace``, start its replacement now, while it dies: the queue's next item then waits
        for one fork, not for the death, the burial and then the fork (see ``respawn``)."""
        if lane.kill_reason is not None:
            return
        lane.kill_reason, lane.kill_offset = reason, offset
        # Killed while letting go of the chunk it answered: for none of its tasks. Should it
        # start the next before the kill lands, that chunk's items go again, none blamed.
        lane.kill_chunk = -1 if not lane.tasks else (
            FREED_CHUNK if reason == "timeout" and offset == OFFSET_FREEING
            else lane.tasks[0].id)
        lane.kill_at = time.monotonic()
        self.spare.wanted = True
        if reason == "timeout":  # a hung item's stack says where it hung (TaskTimeout.stack)
            lane.stack_mark = lane.err.total
        threading.Thread(target=_stop, args=(lane.pid, self._kill_grace, reason == "timeout"),
                         daemon=True, name="stagepool-kill").start()
        if replace:
            lane.replaced = True
            self.lanes.append(self.spawn())

    def kill_running(self, group: Group, *, replace: bool) -> None:
        """Kill the workers *running* a chunk of ``group``: a chunk merely prefetched behind
        another batch's running chunk is short by construction; it runs, its answer dropped."""
        for lane in self.lanes:
            if lane.tasks and lane.tasks[0].group is group:
                self.kill(lane, "cancelled", self._record.offset(lane.slot), replace=replace)

    def kill_everything(self) -> None:
        """``shutdown(kill=True)``: the items running now say so (reason "shutdown")."""
        for lane in self.lanes:
            if lane.kill_reason is None:
                lane.kill_reason = "shutdown"
                kill_tree(lane.pid, grace=0)

    def collect(self, lane: Lane) -> None:
        """A worker died: end what its items started, then reap it."""
        if lane.kill_reason is None:  # else kill()'s kill_tree gives the group its grace
            kill_group(lane.pid)  # what its items started dies with it (before the reaping join)
        lane.process.join(1.0)

    def autopsy(self, lane: Lane) -> Autopsy:
        """Take a dead worker off the crew and read from the record what it was doing; counts a
        death before any task towards STARTUP_FAILURE_LIMIT. The caller releases the lane."""
        self.lanes.remove(lane)
        self.spare.wanted = True  # workers die here: the next replacement should be ready
        detail = lane.last_words()  # while it still holds its tasks: its last lines name the item
        state = self._record.state(lane.slot)
        tasks = list(lane.tasks)
        lane.tasks.clear()
        if state.phase == PHASE_INIT and lane.kill_reason in (None, "init_timeout"):
            return Autopsy(tasks, in_init=True, died=None)
        died = None
        if bool(tasks) and tasks[0].id == state.chunk and state.phase != PHASE_IDLE:
            died = _moved_on(lane, tasks[0], state.phase, state.offset) or _blamed(
                lane, tasks[0], state, detail)
            self.startup_failures = 0  # it took a task, so start-up works: that task killed it
        elif not lane.answered and lane.kill_reason is None:
            self.startup_failures += 1
        return Autopsy(tasks, in_init=False, died=died)

    def gave_up_starting(self) -> bool:
        """Whether workers keep dying before doing anything (then the caller fails the queue
        instead of respawning forever); the count drops back so that one more try is made."""
        if self.startup_failures < STARTUP_FAILURE_LIMIT:
            return False
        self.startup_failures = STARTUP_FAILURE_LIMIT - 1
        return True

    def respawn(self) -> None:
        """Start a replacement, after a back-off that grows with each start-up failure."""
        time.sleep(min(2.0, 0.05 * 2 ** self.startup_failures) if self.startup_failures else 0)
        self.lanes.append(self.spawn())

    def close(self) -> list[Task]:
        """Kill every worker at once and free its slot; returns the tasks the serving ones held."""
        for lane in list(self.leaving):
            kill_tree(lane.pid, grace=0)
            self.reap(lane)
        spare = self.spare.close()
        if spare is not None:
            self._reap_spare(spare)
        held: list[Task] = []
        for lane in self.lanes:
            kill_tree(lane.pid, grace=0)
            held.extend(lane.tasks)
            self.release(lane)
        self.lanes.clear()
        self._close_template()
        return held
