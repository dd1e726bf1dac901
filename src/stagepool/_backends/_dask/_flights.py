"""Our chunks on the cluster, by dask key: sending one pinned to a worker, and every way one ends
(answered, its worker lost, killed, the engine closed). Each ends exactly once: whichever comes
first takes it out of the book, and what comes later for that key is ignored (a ``KilledWorker``
after we already answered the loss, say).

The dispatcher thread alone uses a ``Flights``; dask's callback thread only puts ``Done``
messages in the dispatcher's inbox (``on_future_done``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import queue
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ..._config import format_size
from .._fairshare import FairShare
from .._protocol import Cancelled, Group, LaneDied, LaneState, Task, TaskResult, notify
from . import _cluster
from ._cluster import RPC_TIMEOUT
from ._frames import Frames, NoRoom
from ._roster import Member
from ._versions import LOGGER

__all__ = ["Call", "Done", "Flights", "Freed", "Inbox", "notify"]


# A chunk's future that dask cancelled without our asking: its client lost the scheduler (it
# cancels every future then) or someone cancelled it through the client. No worker died, so no
# item is to blame: its items are answered cancelled (the batch goes on if the client reconnects).
CANCELLED_BY_CLIENT = Cancelled("dask cancelled the chunk: its client lost the scheduler, or "
                                "the chunk was cancelled through the client")

# But a chunk whose scattered payload died with the worker holding it (the chunk's own worker:
# it is scattered there) is cancelled too, with one of these reasons, usually before the
# membership poll sees that worker gone: that is the worker's loss (``lose``), not a cancel.
PAYLOAD_LOST_REASONS = frozenset({"already forgotten", "lost dependencies"})
LEFT_MID_CHUNK = ("the dask worker left the cluster while running this chunk (killed, crashed "
                  "or disconnected)")


class Done(NamedTuple):
    """A dask future finished (from dask's callback thread, which also fetched its result)."""

    key: str
    result: TaskResult
    error: str | None  # the task failed: why, as dask told it


class Freed(NamedTuple):
    """Dask says the task finished: its worker's slot is free now, while its result is still
    on the way (fetching it costs round trips that the next chunk need not wait for)."""

    key: str


class Call(NamedTuple):
    """Work for the dispatcher thread (a withdraw, a shutdown): lock-free to send."""

    fn: Callable[[], None]


Inbox = queue.SimpleQueue[Done | Freed | Call | None]  # None: only wake up


@dataclasses.dataclass(eq=False, slots=True)
class _Running:
    key: str
    task: Task
    worker: Member
    future: Any  # distributed.Future
    data: Any = None  # the scattered payload's future: held until the chunk answers
    # Set by dask's callback thread the moment dask says the task finished: all its items ran,
    # even if its result is then lost with its worker (a plain bool store: no lock needed).
    finished: bool = False
    holds_slot: bool = True  # counted in its worker's ``busy`` (until Freed or its end)
    sent: float = dataclasses.field(default_factory=time.monotonic)  # for lane_states()

    def release(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.worker.busy -= 1


def on_future_done(inbox: Inbox, run: _Running, future: Any) -> None:
    """In dask's callback thread: fetch the answer here, so the dispatcher never waits for bytes
    to cross the network."""
    key = run.key
    try:
        if future.status == "finished":
            run.finished = True
            inbox.put(Freed(key))
            # Through the scheduler, not straight from the worker (1.23x client.map's speed on 4
            # x 100 MiB against 0.71x): a direct gather from a worker that died holding the
            # result waits for dask to recompute the key, in dask's one callback thread, holding
            # up every other future's callback (lost-result tests waited past 30 s).
            inbox.put(Done(key, future.result(timeout=RPC_TIMEOUT), None))
        elif future.status == "error":
            exc = future.exception(timeout=RPC_TIMEOUT)
            inbox.put(Done(key, None, f"{type(exc).__name__}: {exc}"))
        elif future.status == "cancelled" and run.data is not None and \
                _cancel_reason(future) in PAYLOAD_LOST_REASONS:
            inbox.put(Done(key, None, LEFT_MID_CHUNK))
        elif future.status == "cancelled":  # not by us (ours leave the book first): no death
            inbox.put(Done(key, CANCELLED_BY_CLIENT, None))
        else:
            inbox.put(Done(key, None, f"dask reports the task {future.status}"))
    except BaseException as exc:  # lost with its worker, or the client is closing
        inbox.put(Done(key, None, f"{type(exc).__name__}: {exc}"))


def _cancel_reason(future: Any) -> str | None:
    """Why dask cancelled ``future`` (its ``FutureCancelledError.reason``)."""
    try:
        future.result(timeout=RPC_TIMEOUT)  # a cancelled future raises at once
    except BaseException as exc:
        return getattr(exc, "reason", None)
    return None


class Flights:
    """The book of one engine's running chunks (see the module docstring)."""

    def __init__(self, client: Any, name: str, fair: FairShare, inbox: Inbox,
                 in_band: Callable[[Any], Any]) -> None:
        self._client, self._name, self._queue, self._inbox = client, name, fair, inbox
        self._in_band_codec = in_band  # a chunk's frames as one pickle (see _refused)
        # Per worker address: the smallest chunk of frames its /dev/shm refused (NoRoom). Chunks
        # as big go to it in-band at once: each refusal cost a wasted transfer of the chunk.
        self._no_room: dict[str, int] = {}
        self._keys = itertools.count()
        self._running: dict[str, _Running] = {}

    def __bool__(self) -> bool:
        return bool(self._running)

    def lane_states(self, members: Iterable[Member]) -> list[LaneState]:
        """Per worker thread: busy on a chunk since it was sent (which item inside it is not
        known here: the lanes that run it are on the worker's host), or idle."""
        busy = [LaneState(r.worker.address, r.task.id, -1, r.sent)
                for r in list(self._running.values())]
        idle = [LaneState(m.address, 0, -1, None) for m in list(members)
                for _ in range(max(0, m.threads - m.busy))]
        return busy + idle

    def send(self, worker: Member, task: Task) -> bool:
        """Submit one chunk pinned to ``worker``; False (the task queued again, at the front) if
        dask refused it: the worker just left, or the client is closing. Frames as big as some
        that ``worker``'s /dev/shm refused go in-band (``_refused``)."""
        key = f"{self._name}-{next(self._keys)}"
        refused = self._no_room.get(worker.address)
        if refused is not None and isinstance(task.items, Frames) and task.items.nbytes >= refused \
                and not self._in_band(task, f"dask worker {worker.address}"):
            return True  # answered: it cannot be sent at all
        try:
            future, data = _cluster.submit_chunk(self._client, self._name, key, worker.address,
                                                 task, worker.capacity.resources)
        except Exception:
            self.requeue(task)
            return False
        worker.busy += 1
        run = self._running[key] = _Running(key, task, worker, future, data)
        future.add_done_callback(functools.partial(on_future_done, self._inbox, run))
        return True

    def requeue(self, task: Task) -> None:
        """Back to the front of the queue, to run elsewhere (answered Cancelled if its batch was
        cancelled meanwhile)."""
        for refused in self._queue.queue([task], front=True):
            notify(refused, Cancelled("batch cancelled"))

    def finish(self, done: Done | Freed) -> None:
        """A chunk answered; or it finished but its result was lost with its worker (see
        ``_answer_lost``); or dask gave up on it: then its worker died (``KilledWorker``), and
        every chunk of ours there ends at once, as in ``lose``."""
        run = self._running.get(done.key)
        if run is None:  # ended already: its worker left, or it was killed
            return
        if isinstance(done, Freed):
            run.release()
            return
        if done.error is not None and not run.finished:
            self._end(run.worker, done.error, graceful=False)
            return
        del self._running[done.key]
        run.release()
        if isinstance(done.result, NoRoom):
            self._refused(run, done.result)
        elif done.error is None:
            notify(run.task, done.result)
        else:
            ended = _cluster.chunks_ended(self._client, self._name, run.worker.address)
            self._answer_lost(run, ended.get(run.key))

    def _refused(self, run: _Running, answer: NoRoom) -> None:
        """The worker's /dev/shm could not take the chunk's frames; nothing ran. Send it again as
        one pickle, charged nothing (to the front of the queue: its batch waits on it)."""
        address = run.worker.address
        if address not in self._no_room:
            LOGGER.warning("%s: no room in /dev/shm for a chunk's arrays (%s): sending them "
                           "through the pipe instead, slower; give its host more /dev/shm "
                           "(docker run --shm-size=...)", answer.where, format_size(answer.nbytes))
        self._no_room[address] = min(answer.nbytes, self._no_room.get(address, answer.nbytes))
        if self._in_band(run.task, answer.where):
            self.requeue(run.task)

    def _in_band(self, task: Task, where: str) -> bool:
        """Re-encode ``task``'s frames as one pickle (``PickleCodec.in_band``); False if that
        raised (then the task is answered, as it can never be sent)."""
        try:
            task.items = self._in_band_codec(task.items)
        except Exception as exc:  # pickling raised now what it did not raise the first time
            notify(task, Cancelled(f"{where} had no room in /dev/shm for the chunk's arrays, "
                                   f"and they could not be pickled: {exc}", cause=exc))
            return False
        return True

    def lose(self, member: Member) -> None:
        """A worker left the cluster; retired (gracefully) or not, as the scheduler tells."""
        if any(run.worker is member for run in self._running.values()):
            self._end(member, LEFT_MID_CHUNK,
                      graceful=_cluster.left_gracefully(self._client, member.address))

    def _end(self, member: Member, why: str, *, graceful: bool) -> None:
        """Every chunk of ours on ``member`` ends. Retired: nothing of ours is to blame (see
        ``_retired``). Else its oldest ``slots``
        chunks that had not ended may have been running (dask starts them in the order sent):
        each fails as "died on an unknown item" and the batch finds the culprit; the younger
        ones were waiting in its queue: they simply run again elsewhere; the ended ones lost
        only their answers (``_answer_lost``). Ended: dask told us it finished, or the worker
        recorded its end with the scheduler (before starting a chunk waiting behind it:
        ``HostPlugin``), so a chunk whose "finished" was still on its way does not pass for
        the running one."""
        member.gone = True
        lost = [run for run in self._running.values() if run.worker is member]
        if graceful:
            self._retired(member, lost)
            return
        ended = _cluster.chunks_ended(self._client, self._name, member.address) if lost else {}
        suspects = 0
        for run in lost:  # the book keeps the order they were sent in
            del self._running[run.key]
            run.release()
            if run.finished or run.key in ended:
                self._answer_lost(run, ended.get(run.key))
                continue
            if suspects >= member.capacity.slots:
                self.requeue(run.task)
                continue
            suspects += 1
            notify(run.task, LaneDied(member.pid, None, -1, "crash", why,
                                      where=f"dask worker {member.address}"))
        self._cancel(lost)

    def _retired(self, member: Member, lost: list[_Running]) -> None:
        """``member`` was retired: nothing of ours is to blame. A chunk dask saw finish keeps
        its place in the book: dask moves a retiring worker's results to another worker, and
        if it did not move this one, its fetch fails and ``finish`` answers it as lost. The
        others stop there; the worker recorded, as it closed, how many items of each running
        chunk had started (``HostPlugin``): those count that run (``LaneDied`` "lost" with
        ``ran``: charged, or reported lost under ``rerun_innocent=False``), the rest run again
        elsewhere uncharged, as does every chunk without such a record (waiting, or none came)."""
        if not lost:
            return
        started = _cluster.retired_chunks(self._client, self._name, member.address) or {}
        ended = _cluster.chunks_ended(self._client, self._name, member.address)
        stopped = [run for run in lost if not run.finished]
        for run in stopped:
            del self._running[run.key]
            run.release()
            ran = started.get(run.key, 0)
            if run.key in ended:  # it ended before the retirement: its answer died
                self._answer_lost(run, ended[run.key])
            elif ran == 0:
                self.requeue(run.task)
            else:
                notify(run.task, LaneDied(member.pid, None, -1, "lost", "was retired while running "
                                          "its chunk", where=f"dask worker {member.address}",
                                          ran=ran))
        self._cancel(stopped)

    def _answer_lost(self, run: _Running, record: dict[str, Any] | None) -> None:
        """``run`` ended on its worker, which died before we had its answer. Its end ``record``
        (None: none reached the scheduler) says how: the lanes' own ``LaneDied`` is answered as
        it was; a chunk that never ran (cancelled there) runs again, charged nothing; else every
        item ran, and nobody is to blame: ``LaneDied`` "lost", so that the batch counts that
        run (``attempts``) and, under ``rerun_innocent=False``, runs none of them again."""
        if record is not None and "cancelled" in record:
            self.requeue(run.task)
            return
        died = record.get("died") if record is not None else None
        if isinstance(died, dict):
            with contextlib.suppress(TypeError):  # a record of another version: a plain loss
                notify(run.task, LaneDied(**died))
                return
        member = run.worker
        notify(run.task, LaneDied(member.pid, None, -1, "lost", "died after its chunk ended",
                                  where=f"dask worker {member.address}", ran=run.task.n_items))

    def withdraw_ahead(self, match: Callable[[Task], bool], reason: str) -> None:
        """Cancel the matching chunks that wait in a worker's queue behind its ``slots`` oldest
        ones (sent ahead, not started): as a queued chunk, each is answered ``Cancelled`` and
        never runs. The ones that may be running are left to finish."""
        ahead: list[_Running] = []
        seen: dict[Member, int] = {}
        for run in self._running.values():  # in the order sent, as the workers start them
            if run.finished:
                continue
            n = seen[run.worker] = seen.get(run.worker, 0) + 1
            if n > run.worker.capacity.slots and match(run.task):
                ahead.append(run)
        for run in ahead:
            del self._running[run.key]
            run.release()
            notify(run.task, Cancelled(reason))
        self._cancel(ahead)

    def kill(self, group: Group | None, reason: str) -> None:
        """Cancel the running chunks of ``group`` (None: all): each worker side sees its task
        cancelled and kills its lanes; each chunk is answered ``Cancelled(reason)``."""
        runs = [run for run in self._running.values() if group is None or run.task.group is group]
        for run in runs:
            del self._running[run.key]
            run.release()
            notify(run.task, Cancelled(reason))
        self._cancel(runs)

    def kill_for_shutdown(self, reason: str) -> None:
        """``shutdown(kill=True)``: kill every running chunk, and answer each with what its
        worker recorded as it killed the lanes (``_killed_answer``), so that items that ran say
        so; the chunks waiting in a worker's queue never started: ``Cancelled(reason)``."""
        runs = list(self._running.values())
        self._running.clear()
        for run in runs:
            run.release()
        self._cancel(runs)
        # A chunk that ended holds no slot: the one behind it may be running (its worker
        # records an end before starting the next chunk, so the record says which).
        records: dict[str, dict[str, Any]] = {}
        for address in {run.worker.address for run in runs}:
            records.update(_cluster.chunks_ended(self._client, self._name, address))
        ended = [run for run in runs if run.finished or run.key in records]
        maybe = ended + self._maybe_running([run for run in runs if run not in ended])
        for address in {run.worker.address for run in maybe}:
            keys = {run.key for run in maybe if run.worker.address == address}
            records.update(_cluster.ended_within(self._client, self._name, address, keys,
                                                 _cluster.KILL_RECORD_WAIT))
        for run in runs:
            notify(run.task, _killed_answer(run, records.get(run.key), reason))

    @staticmethod
    def _maybe_running(runs: list[_Running]) -> list[_Running]:
        """Per worker, its ``slots`` oldest chunks (dask starts them in the order sent)."""
        seen: dict[Member, int] = {}
        maybe = []
        for run in runs:
            n = seen[run.worker] = seen.get(run.worker, 0) + 1
            if n <= run.worker.capacity.slots:
                maybe.append(run)
        return maybe

    def abandon(self, answer: Cancelled) -> None:
        """The engine is closing: every running chunk is answered ``answer``, nothing cancelled
        (the plugin's removal kills the lanes)."""
        for run in self._running.values():
            notify(run.task, answer)
        self._running.clear()

    def _cancel(self, runs: list[_Running]) -> None:
        if runs:
            with contextlib.suppress(Exception):  # the client is closing: nothing left to cancel
                self._client.cancel([run.future for run in runs])


def _killed_answer(run: _Running, record: dict[str, Any] | None, reason: str) -> TaskResult:
    """A chunk killed by ``shutdown(kill=True)``, from its worker's end record: the lanes'
    death (the running item and how many ran), said to be the shutdown's; answered in full
    before the kill (every item ran, the answer dropped); or never run (cancelled there, or no
    record: nothing says it ran)."""
    died = record.get("died") if record is not None else None
    if isinstance(died, dict):
        with contextlib.suppress(TypeError):  # a record of another version: as if none came
            lanes = LaneDied(**died)
            if lanes.reason == "cancelled":  # the cancel of our kill reached the lanes first
                lanes = dataclasses.replace(lanes, reason="shutdown")
            return lanes
    if record is not None and "cancelled" not in record and "died" not in record:
        return LaneDied(run.worker.pid, None, -1, "shutdown", "", where=f"dask worker "
                        f"{run.worker.address}", ran=run.task.n_items)
    return Cancelled(reason)
