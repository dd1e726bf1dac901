"""The seam between the engine and a place that runs chunks: the protocol and its value types.

See the package docstring (``stagepool._backends``) for the picture.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from .._chunking import CHUNK_BYTES
from .._transport import OverBudget

__all__ = [
    "Backend",
    "BackendName",
    "BackendOptions",
    "Cancelled",
    "Capabilities",
    "Codec",
    "DeathReason",
    "Encoded",
    "Group",
    "LaneDied",
    "LaneState",
    "OverBudget",
    "Task",
    "TaskResult",
    "notify",
]

_task_ids = itertools.count(1)

BackendName = Literal["local", "serial", "dask"]
# "lost": the worker died after the task ended, with its answer (see ``LaneDied``).
# "cancelled": killed because its batch was cancelled; "shutdown": by ``shutdown(kill=True)``.
DeathReason = Literal["crash", "timeout", "memory", "cancelled", "initializer", "init_timeout",
                      "lost", "shutdown"]


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the engine adapts to it and refuses options it cannot honour."""

    exact_blame: bool  # a dead worker's item is known (else: offset -1 and the engine bisects)
    survives_crash: bool  # a segfault / os._exit in an item fails that item, not the caller
    hard_timeouts: bool  # a running item can be stopped at its timeout (its process tree killed)
    kills_running: bool  # running work can be killed on cancel (on_cancel="kill", shutdown(kill))
    shared_memory: bool  # big numpy arrays travel through /dev/shm
    memory_limits: bool  # max_rss_per_worker / max_tasks_per_worker are enforced
    processes: bool  # work runs in other processes, so a raised KeyboardInterrupt is the item's
    serializes: bool  # items, functions and results are pickled: what cannot be fails its item
    # A one-item task costs well under a millisecond (same-host pipes). Not on a cluster, where
    # every task is a round trip through its scheduler (~10-20 ms): thousands of single calls
    # are then slow, though chunked batches are not.
    fast_round_trip: bool = True
    # Work per automatic chunk, seconds: enough to amortise the round trip of one chunk.
    chunk_seconds: float = 0.02
    # Payload per automatic chunk, bytes (_chunking.CHUNK_BYTES, 4 MiB, sized for a local
    # round trip of ~0.1 ms): a backend whose chunk costs more to send raises it.
    chunk_bytes: int = CHUNK_BYTES
    # Honours Task.budget: a chunk may come back cut short, its unstarted rest the engine's.
    cuts_chunks: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class LaneDied:
    """The worker running a task died (or was killed by us) before answering.

    ``offset`` is the position in the chunk of the item it was running, or -1 when the backend
    cannot say (it was decoding or encoding, or the backend has no exact blame): the engine then
    finds the guilty item by running the chunk again in halves. ``ran`` is how many of the
    chunk's items had finished running (their results lost with the worker), None when unknown:
    the engine counts each such run in the items' ``attempts``.

    Reason ``"lost"``: no item is to blame; the first ``ran`` items (None: all) ran, or were
    running, and their answers died with the worker: a cluster worker killed after the task
    ended, before its result was fetched, or retired while running it. ``detail`` then says
    how the worker went ("died after its chunk ended"). The engine runs them again, charged,
    or with ``rerun_innocent=False`` reports their results lost; the rest never started.
    """

    pid: int
    exitcode: int | None
    offset: int
    reason: DeathReason
    detail: str = ""  # the last lines the worker wrote to stderr (faulthandler dump included)
    where: str = ""  # a worker's name where a pid says little (a cluster worker's address)
    ran: int | None = None
    initializer: str = ""  # reason "initializer" (it died in it): the initializer's name
    duration: float = 0.0  # seconds the item had run when it died or was killed (0: unknown)
    stack: str = ""  # the worker's Python stack at the end (faulthandler dump), "" if unknown


@dataclasses.dataclass(frozen=True, slots=True)
class LaneState:
    """What one worker (a lane, or a cluster worker's thread) is doing now (``lane_states``)."""

    worker: str  # its pid, or a cluster worker's address
    task: int  # the id of the task it runs; 0: idle
    offset: int  # the running item's position in that task; -1: unknown or between items
    since: float | None  # time.monotonic() when that item (or its chunk) started; None: unknown


@dataclasses.dataclass(frozen=True, slots=True)
class Cancelled:
    """The task was withdrawn before it ran (shutdown with ``cancel_futures`` or a cancelled batch),
    or will never run because the backend failed: ``cause`` is then that failure."""

    reason: str
    cause: BaseException | None = None


# The answer of a task: the codec's encoded chunk result (decode it with ``Codec.decode``), or
# one of the two facts above.
TaskResult = Any


class Group:
    """The tasks of one batch (or of every ``submit``): served by fair share against other groups.

    Once ``cancelled``, no task of the group is started again, even one that was requeued
    because its worker died after the cancellation.
    """

    __slots__ = ("bundler", "cancelled", "served")

    def __init__(self, bundler: Bundler | None = None) -> None:
        self.cancelled = False
        self.served = 0.0  # estimated seconds of work dispatched: the backend's fair share
        self.bundler = bundler  # how its short tasks may travel together (None: they never do)


class Bundler(Protocol):
    """How a group's short one-item tasks may be merged into one task (the engine's single calls:
    one message, one answer and one worker wake-up for several calls). A backend that bundles
    (the local one) calls ``accepts`` on each task already started (``on_start``), then ``merge``
    on two or more of them; the merged task's ``on_done`` answers each member's ``on_done``."""

    def accepts(self, task: Task) -> bool:
        """Whether ``task`` may travel with others."""

    def merge(self, tasks: list[Task]) -> Task:
        """One task running ``tasks``' items in order. Quick: it runs in the backend's thread."""


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """A chunk's items as the backend's codec encoded them, and their size in bytes."""

    payload: Any
    nbytes: int


@dataclasses.dataclass(eq=False, slots=True)
class Task:
    """One chunk on its way to a worker.

    ``items`` is already encoded by the submitting thread (a backend thread never pickles);
    ``fn`` is the codec's form of the function, sent once per worker for each ``fn_key``.
    ``on_done`` is called exactly once, from a backend thread (or, for the serial backend, the
    submitting one), with the result; it must be quick and must not block. From then on it owns
    ``items``: the submitter may still need the inputs (to send some again), so the backend
    never frees them itself.
    """

    group: Group
    fn_key: int
    fn: Any
    items: Any
    n_items: int
    on_done: Callable[[Task, TaskResult], None]
    timeouts: tuple[float, ...] | None = None  # per item, seconds; None = no limit
    expected: float | None = None  # the engine's estimate of the chunk's duration, seconds
    per_item_clock: bool = True  # False for tiny items: durations become the chunk's mean
    # Called by the backend right before the task goes to a worker (again after a requeue);
    # False withdraws it instead (answered ``Cancelled``). Quick, must not block.
    on_start: Callable[[Task], bool] | None = None
    first: int = -1  # the batch index of its first item (-1: not a batch's), for worker logs
    # Part of a batch's planned rest (_chunking.plan_ends): it may wait on a busy worker behind
    # another planned chunk, whatever its estimate (the plan's small last chunks keep the tail
    # balanced), instead of a round trip through the pool thread after each chunk.
    planned: bool = False
    # Each item's batch index where it is not first + offset (a cost-arranged batch runs its
    # items longest-first), for worker logs.
    indices: tuple[int, ...] | None = None
    # Seconds after which the worker may stop between items and answer with fewer values than
    # items (the rest never started). None: run them all. Only for backends that cut chunks.
    budget: float | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_task_ids))


class Codec(Protocol):
    """How a backend's tasks carry functions, items and results.

    Locally: cloudpickle with big arrays in shared memory; in-process: the objects themselves.
    Every method may be called from any submitting thread; ``encode`` raises what pickling
    raises (the engine then isolates the item that will not encode).
    """

    def function(self, fn: Callable[..., Any]) -> tuple[int, Any]:
        """A key (equal for equal functions) and the form workers receive; raises if it cannot
        be encoded (an unpicklable function)."""

    def encode(self, items: list[Any], arena: int | None, budget: int | None = None) -> Encoded:
        """The chunk's items for the workers; ``arena`` groups one batch's reusable memory.
        ``budget``: raise ``OverBudget`` (nothing kept) rather than make a payload of more bytes
        than that; a codec whose payload copies nothing may ignore it."""

    def keep(self, encoded: Encoded, items: list[Any]) -> list[Any]:
        """What the batch holds to send again (a crash's innocents, retries): the items, or
        lighter views of what ``encode`` made."""

    def decode(self, result: Any) -> Any:
        """The ``_worker.ChunkResult`` of an answer; raises if it cannot be decoded."""

    def release(self, items: Any, arena: int | None) -> None:
        """The task's inputs are no longer needed; reuse their memory in ``arena`` if given."""

    def drop(self, result: Any) -> None:
        """An answer nobody will decode: free what it holds."""

    def open_arena(self, arena: int) -> None: ...

    def close_arena(self, arena: int) -> None: ...


class Backend(Protocol):
    """What the engine needs from a place that runs chunks."""

    @property
    def workers(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def codec(self) -> Codec: ...

    def check_open(self) -> None:
        """Raise ``EngineClosed`` if this backend takes no more work: it was shut down, or it
        failed on its own (the failure is then the error's ``__cause__``)."""

    def submit_many(self, tasks: list[Task]) -> None:
        """Queue tasks (one wake-up); raises ``EngineClosed`` after shutdown (see ``check_open``)."""

    def withdraw(self, group: Group, *, kill_running: bool = False) -> None:
        """Cancel a group's queued tasks (``on_done(Cancelled)``); optionally kill its running
        ones. Never blocks and takes no lock: it may run inside a garbage collector finalizer."""

    def withdraw_task(self, task: Task) -> None:
        """Cancel one queued task (``on_done(Cancelled)``); a running or finished one is left."""

    def worker_pids(self) -> list[int]:
        """Pids of the live processes that run items (this process for the serial backend,
        none for a remote one)."""

    def lane_states(self) -> list[LaneState]:
        """What each worker is doing now. From any thread; never blocks for long."""

    def shutdown(self, *, wait: bool = True, cancel_pending: bool = False, kill: bool = False) -> None:
        """Stop the workers. ``wait`` lets queued tasks finish first unless ``cancel_pending``;
        ``kill`` kills running work at once. Every task still owed an answer gets ``Cancelled``."""


@dataclasses.dataclass(frozen=True, slots=True)
class BackendOptions:
    """What every backend is built from (the engine's validated settings, already resolved)."""

    workers: int
    initializer: Callable[..., object] | None = None
    initargs: Sequence[Any] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    max_rss: int | None = None
    max_tasks: int | None = None
    # Bytes one item needs: the default memory cap of a local worker when max_rss is None,
    # and what a cluster sizes its slots by.
    mem_per_task: int | None = None
    shm_threshold: int = 0
    writable_inputs: bool = False
    init_timeout: float | None = None  # seconds the initializer may take in a worker
    # Read-only values every worker sees as stagepool.shared(name) (see _shared).
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    preload: tuple[str, ...] = ()  # modules the workers' template imports once (local only)
    # Fork local workers from a warm template process (local only). Off where the lanes are
    # hosted by a dask worker: there a lane's parent must be the dask worker itself, so that the
    # worker's death ends its lanes at once and blames exactly as the dask backend documents.
    template: bool = True


def notify(task: Task, result: TaskResult) -> None:
    """Deliver a result; a faulty callback must never take the backend's thread (the local pool
    thread, the dask dispatcher) down with it. Not even a BaseException: a future's
    done-callbacks run inside ``on_done``, and one that calls ``sys.exit()`` would end that
    thread without a word, leaving every later call waiting.

    The input segments of ``task.items`` are the callback's to free (see ``Task``)."""
    try:
        task.on_done(task, result)
    except BaseException:  # reported, not fatal
        print("stagepool: a task's completion callback raised (ignored):", file=sys.stderr)
        traceback.print_exc()
