"""Everything that runs inside a worker process.

This module is the child side of the pool and imports nothing heavy (no numpy, no psutil, no loky),
so a worker starts fast. One worker runs one chunk at a time:

    parent --(task bytes: chunk id, fn, items, timeouts)--> lane_main --> run_chunk(fn, items)
    parent <--(result bytes: values, timestamps, errors, pid)-----------------/

While it runs, the worker writes *which item it is on* into its slot of a shared record (an mmap of
a memfd owned by the parent). That record is how the parent blames exactly one item when the
worker dies or overruns its timeout: no guessing, no bisection. The write is a single store into
shared memory, cheap enough for items that take a microsecond.

The guards against hostile items (forks, closed std fds, descendants, a dead parent) live in
``_worker_guards``, the stderr pipe and the stack dump on request in ``_worker_stderr``; functions
pickled by reference (``lane_main``, ``apply_call``, ...) stay here.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pickle
import signal
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

from . import _main_globals, _shared, _shm, _transport, _worker_budget, _worker_guards
from ._remote_types import qualified_name as _type_name
from ._wire import TaskHeader, unpack_task
from ._worker_errors import ErrInfo, exc_info, explain_read_only, safe_str
from ._worker_guards import (
    StdFds,
    explain_memory_error,
    flush_std_streams,
    forked_children,
    guard_items,
    lead_own_group,
    leave_fork,
    mark_forked,
    pipe_broken,
    watch_parent,
)
from ._worker_stderr import capture_stderr, let_parent_read

__all__ = [
    "FN_CACHE_SIZE", "RECORD_FIELDS", "SLOT_STRIDE", "ChunkResult", "ErrInfo", "Scratch", "WorkerSetup",
    "apply_call", "call_chunk", "decoded_result", "dumps", "encode_result", "failed_chunk",
    "lane_main", "run_chunk",
]

# Slot layout in the shared record, in 8-byte fields: pid, chunk id, item offset, item start time
# (time.monotonic, shared by all processes on Linux), phase. Phases tell the parent what a dead
# worker was doing: a death while decoding or encoding is not any single item's fault.
RECORD_FIELDS = 5
F_PID, F_CHUNK, F_OFFSET, F_START, F_PHASE = range(RECORD_FIELDS)
# Slots start SLOT_STRIDE fields (128 bytes) apart: two cache lines each, since x86 fetches lines
# in pairs. Packed 40 bytes apart, two workers' slots shared a line, and each worker's per-item
# offset store took that line from the other core: ~150 ns a store in a real two-worker pool
# (a third of the tiny-item loop's time), against ~35 ns on a line of its own.
SLOT_STRIDE = 16
PHASE_IDLE, PHASE_DECODE, PHASE_RUN, PHASE_ENCODE, PHASE_INIT = 0, 1, 2, 3, 4

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL



class ChunkResult(NamedTuple):
    """A chunk's answer: one value per item (None where it failed) and how the items went.

    On the wire it is a plain tuple with the stamps as bytes (``encode_result``,
    ``decoded_result``): pickling the named tuple and the array looked their classes up by name
    on every answer, 12 us of a worker's ~18 us to encode a one-item answer."""

    values: list[Any]
    stamps: array[float]  # n + 1 timestamps (each item's start, then the end), or start and end
    errors: dict[int, ErrInfo] | None  # by offset in the chunk
    pid: int


def decoded_result(wire: Any) -> ChunkResult:
    """The ``ChunkResult`` of an unpickled answer (``encode_result``'s plain tuple)."""
    values, stamps, errors, pid = wire
    clock = array("d")
    clock.frombytes(stamps)
    return ChunkResult(values, clock, errors, pid)


class _Record:
    """This worker's slot in the parent's shared record."""

    def __init__(self, path: str, slot: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        base = slot * SLOT_STRIDE
        self.ints = memoryview(self._mm).cast("q")[base : base + RECORD_FIELDS]
        self.floats = memoryview(self._mm).cast("d")[base : base + RECORD_FIELDS]
        self.ints[F_PID] = os.getpid()


class Scratch:
    """Where run_chunk writes its progress when it runs outside a pool worker (tests, dask, the
    serial backend, whose status() reads it)."""

    def __init__(self) -> None:
        self.ints = memoryview(bytearray(8 * RECORD_FIELDS)).cast("q")
        self.floats = memoryview(bytearray(8 * RECORD_FIELDS)).cast("d")


_NO_RECORD: Any = Scratch()


def dumps(obj: object) -> bytes:
    """Pickle with cloudpickle: as fast as pickle on plain data (measured: 51 vs 47 us for 5,000
    ints), and it also carries lambdas, closures and classes defined in ``__main__``, which a
    worker that did not import the caller's script could not find by reference. Code pickled by
    value keeps its file name, so tracebacks show where it came from (``_transport``)."""
    return _transport.dumps_plain(obj)


def run_chunk(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    record: _Record | Scratch | None = None,
    chunk_id: int = 0,
    timed: bool = False,
    per_item_clock: bool = True,
    passthrough: tuple[type[BaseException], ...] = (),
    readonly_inputs: bool = False,
    budget: float = 0.0,
) -> ChunkResult:
    """Run ``fn`` on each item; capture each value or exception, and when each item started.

    Never raises for an item's failure, including ``SystemExit`` and ``KeyboardInterrupt`` raised by
    the function: those are that item's error, not the worker's death.

    ``per_item_clock=False`` is the loop for tiny items (under ~10 us each; two clock reads cost
    ~0.1 us, as much as a trivial item): the timestamps are then only the chunk's start and end,
    and each item's duration is the chunk's mean. ``timed`` (a per-item timeout is running) adds
    each item's start time to the record, for the parent's deadline; tiny items skip that too,
    even when timed: the parent then watches their offsets instead
    (``_backends._local._limits.sampled_deadline``).
    ``budget`` (seconds, 0.0: none): the chunk stops between items once it has run that long,
    and the answer holds fewer values than ``items``: the rest never started (the parent sends
    it again). Checked after each item with ``per_item_clock``; else a timer thread ends the
    loop after the running item (``_worker_budget``), so a slow first item comes back alone,
    items that turn slow inside the chunk stop it within an item (and the switch interval),
    and tiny items pay no clock read at all. A list ``items`` is emptied then (the worker's
    decoded chunk is its own); another sequence is run with a clock read per item.
    Exceptions of the ``passthrough`` types propagate (in-process runs: the caller's Ctrl-C).
    ``readonly_inputs``: the items' arrays are read-only, so a "read-only" ValueError gets a
    note saying how to get writable inputs.

    In a pool worker, a child process that ``fn`` forked and that comes back here (returning or
    raising, ``sys.exit`` included) exits at once: only the worker itself may answer.
    """
    values: list[Any] = []
    errors: dict[int, ErrInfo] | None = None
    clock = time.perf_counter
    if record is None:
        record = _NO_RECORD
    ints = record.ints
    ints[F_CHUNK] = chunk_id
    ints[F_PHASE] = PHASE_RUN
    forked = forked_children  # non-empty only in a child that the item forked: it must not go on
    stamps = array("d") if per_item_clock else array("d", [clock()])
    # One try around the loop, not one per item: after a failure it resumes with the next item.
    # No "did the item fork?" test per item: a forked child's at-fork hook empties ``items``
    # (_worker_guards.mark_forked), so its loop ends and it leaves below.
    guard_items(items)
    it = _numbered(items)
    # The budget runs from the chunk's start, across the items that raise.
    stop = clock() + budget if budget > 0 else None
    try:
        while True:
            try:
                if stop is None:
                    _loop(fn, it, record, stamps if per_item_clock else None, values)
                elif per_item_clock:
                    _loop(fn, it, record, stamps, values, stop)
                else:
                    _budgeted(fn, items, it, record, values, stop)
                break
            except BaseException as exc:
                if forked:
                    leave_fork(exc)
                if isinstance(exc, passthrough):
                    raise
                errors = _add_error(errors, len(values), exc, readonly_inputs)  # its offset
                values.append(None)
                del exc
                # What it wrote to stderr is logged with it, not with the next item.
                let_parent_read(clock() - stamps[-1] if per_item_clock and stamps else 0.0)
    finally:
        guard_items(None)
    if forked:
        leave_fork(None)
    stamps.append(clock())
    return ChunkResult(values, stamps, errors, os.getpid())


# Offsets 0, 1, 2 ... made once, for the chunks to come: enumerate makes an int per item past
# 256, ~10 ns of the ~100 ns the tiny-item loop spends on an item. Built up to the largest chunk
# seen (a chunk holds at most 65,536 items unless the caller fixes a bigger chunk_size: then
# enumerate); ~36 bytes an offset, against at least 8 for each item of the chunk itself.
_offsets: list[int] = []
MAX_OFFSETS = 1 << 16


def _numbered(items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    """``enumerate(items)``, with offsets made once per process."""
    global _offsets
    n = len(items)
    if n > MAX_OFFSETS:
        return enumerate(items)
    offsets = _offsets
    if len(offsets) < n:  # a new list, not extended in place: another thread may be zipping it
        offsets = _offsets = list(range(n))
    return zip(offsets, items, strict=False)  # the offsets outnumber the items


def _loop(fn: Callable[[Any], Any], it: Iterator[tuple[int, Any]], record: _Record | Scratch,
          stamps: array[float] | None, values: list[Any], stop: float = math.inf) -> None:
    """Run ``fn`` on the rest of ``it``, each item's offset in the record first (exact blame
    when the worker dies); ``stamps``: each item's start time too (None: tiny items), and
    then it returns after an item that ended past ``stop`` (a budget: the rest never starts)."""
    ints, floats = record.ints, record.floats
    if stamps is None:  # tiny items: a crashed one ran since about then; status() counts from here
        floats[F_START] = time.monotonic()
        for offset, item in it:
            ints[F_OFFSET] = offset
            values.append(fn(item))  # a method call 3.11 specialises: ~4 ns less than a bound one
        return
    stamp, now, clock = stamps.append, time.monotonic, time.perf_counter
    for offset, item in it:
        # The start time first: the parent reads the offset first, then the time. Always
        # written (~50 ns): it is also how long a crashed or timed-out item ran, and what
        # status() counts from.
        floats[F_START] = now()
        ints[F_OFFSET] = offset
        stamp(clock())
        values.append(fn(item))
        if stop < math.inf and clock() >= stop:  # one more clock read only with a budget
            return


def _budgeted(fn: Callable[[Any], Any], items: Sequence[Any], it: Iterator[tuple[int, Any]],
              record: _Record | Scratch, values: list[Any], stop: float) -> None:
    """The tiny-item loop of ``_loop`` on the rest of ``it`` (which iterates ``items``), ended
    after the running item once ``time.perf_counter()`` passed ``stop``: the budget thread
    empties ``items`` then (``_worker_budget``), so the loop reads no clock. Re-entered after
    an item's error, it stays armed; a sequence that is not a list gets a clock read per item.
    Each item's offset still goes to the record first (``_loop``): blame stays exact.

    It replaced clock reads between blocks of 1, 1, 2, 4 ... 1,024 items, as cheap per item,
    under which items that turned slow inside a block all ran before the next read: 3,000 tiny
    items then 300 of 10 ms ran the slow ones on one worker, 3.06 s against 1.5 s."""
    if type(items) is not list:
        _loop(fn, it, record, array("d"), values, stop)
        return
    _worker_budget.arm(items, stop)
    _loop(fn, it, record, None, values)
    _worker_budget.disarm()


def _add_error(errors: dict[int, ErrInfo] | None, offset: int, exc: BaseException,
               readonly_inputs: bool = False) -> dict[int, ErrInfo]:
    errors = {} if errors is None else errors
    if readonly_inputs:
        explain_read_only(exc)
    explain_memory_error(exc)
    errors[offset] = exc_info("error", exc)
    return errors


def encode_result(result: ChunkResult, setup: WorkerSetup | None = None) -> bytes:
    """Pickle a chunk result (big arrays into shared memory); a value that cannot be pickled
    fails its own item, not the chunk."""
    def encode(obj: object) -> bytes:
        if setup is None:
            return _transport.dumps(obj, threshold=0, owner=os.getpid(), creator="p")
        return _transport.dumps(obj, threshold=setup.shm_threshold, owner=setup.ppid,
                                creator=f"w{os.getpid()}", writable=True)

    values, stamps, errors, pid = result
    try:
        return encode((values, stamps.tobytes(), errors, pid))
    except BaseException:
        pass
    errors = dict(errors or {})
    clean: list[Any] = []
    for offset, value in enumerate(values):
        try:
            dumps(value)
            clean.append(value)
        except BaseException as exc:
            clean.append(None)
            msg = (f"the result ({_type_name(value)}) cannot be pickled to send it back: "
                   f"{type(exc).__name__}: {safe_str(exc)}")
            errors[offset] = ErrInfo("serialization", None, "SerializationError", msg,
                                     "".join(traceback.format_exception(exc)))
    return encode((clean, stamps.tobytes(), errors, pid))


def apply_call(call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> Any:
    """The item function of ``Engine.submit``: each item is one ``(fn, args, kwargs)`` call."""
    fn, args, kwargs = call
    return fn(*args, **kwargs)


def call_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """``Executor.map(..., chunksize=n)``: one call runs ``fn`` on n argument tuples (the first
    exception fails the chunk, as in the standard library's executor)."""
    return [fn(*args) for args in chunk]


# ---- the worker's main loop -------------------------------------------------------------------

FN_CACHE_SIZE = 16  # functions a worker keeps unpickled; the parent mirrors this exactly


class _FnCache:
    """Functions already unpickled in this worker, by the parent's key (one per function).

    The parent sends a function's blob only when its mirror of this cache (same size, same
    first-in-first-out eviction, same order of arrival) says the worker lacks it. A function that
    fails to unpickle is cached as its exception, so every later chunk fails the same way.
    """

    def __init__(self, size: int = FN_CACHE_SIZE) -> None:
        self._fns: dict[int, Callable[[Any], Any] | BaseException] = {}
        self._size = size

    def get(self, key: int, blob: bytes | None) -> Callable[[Any], Any]:
        if blob is not None:
            try:
                fn: Callable[[Any], Any] | BaseException = pickle.loads(blob)
            except BaseException as exc:
                fn = exc
            self._fns.pop(key, None)
            self._fns[key] = fn
            if len(self._fns) > self._size:
                self._fns.pop(next(iter(self._fns)))
        cached = self._fns.get(key)
        if cached is None:
            raise KeyError(f"function {key} was never sent to this worker")
        if isinstance(cached, BaseException):
            raise cached
        return cached


def failed_chunk(n_items: int, kind: str, exc: BaseException, what: str) -> ChunkResult:
    """The answer of a chunk none of whose items could run (``kind`` "error": the initializer
    failed; "serialization" / "unpickle": the function / an argument did not unpickle)."""
    info = exc_info(kind, exc)
    message = f"{what}: {info.type_name}: {info.message}"
    if kind == "error":
        from ._errors import InitializerError

        info = ErrInfo(kind, dumps(InitializerError(message)), "InitializerError", message,
                       info.traceback)
    else:
        info = info._replace(blob=None, message=message)
    return ChunkResult([None] * n_items, array("d", [0.0] * (n_items + 1)),
                       dict.fromkeys(range(n_items), info), os.getpid())


def _handle(
    header: TaskHeader, items_blob: bytes | memoryview, fns: _FnCache, record: _Record,
    init_error: BaseException | None, setup: WorkerSetup,
) -> bytes:
    chunk_id, fn_key, fn_blob, n_items, timed, per_item_clock, budget = header
    ints = record.ints
    # The offset first: the parent reads the chunk, then the offset (SharedRecord.state).
    ints[F_OFFSET], ints[F_CHUNK], ints[F_PHASE] = -1, chunk_id, PHASE_DECODE
    if init_error is not None:
        result = failed_chunk(n_items, "error", init_error, "the worker initializer failed")
    else:
        try:
            fn = fns.get(fn_key, fn_blob)
        except BaseException as exc:
            result = failed_chunk(n_items, "serialization", exc,
                                     "the function could not be unpickled in the worker")
        else:
            frozen = _transport.read_only_arrays
            try:
                items = cast(list[Any], _transport.loads(
                    items_blob, writable=setup.writable_inputs, unlink=False))
            except BaseException as exc:
                # Not one item's fault yet: the parent re-sends the items one by one to find it.
                result = failed_chunk(n_items, "unpickle", exc,
                                         "an argument could not be unpickled in the worker")
            else:
                readonly = not setup.writable_inputs and (  # some input array is read-only
                    frozen != _transport.read_only_arrays or bool(_shm.segment_names(items_blob)))
                result = run_chunk(fn, items, record=record, chunk_id=chunk_id, timed=timed,
                                   per_item_clock=per_item_clock, readonly_inputs=readonly,
                                   budget=budget)
                del items
                _shm.release_inputs(items_blob)  # before answering: then it may recycle
    ints[F_PHASE] = PHASE_ENCODE
    blob = encode_result(result, setup)
    ints[F_PHASE] = PHASE_IDLE
    return blob


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker needs to know at start-up (pickled once, when it is spawned)."""

    record_path: str  # the shared record (see RECORD_FIELDS)
    slot: int  # this worker's slot in it
    ppid: int  # the parent: when it goes away, so do we
    initializer: Callable[..., object] | None = None
    initargs: tuple[Any, ...] = ()
    data_limit: int | None = None  # RLIMIT_DATA in bytes: a runaway allocation -> MemoryError
    shm_threshold: int = 0  # result arrays this big go back through shared memory
    writable_inputs: bool = False  # input arrays as private copy-on-write views (else read-only)
    # Segments (see _shared) holding the engine's shared values and (initializer, initargs):
    # names, so that what the process start pipe carries stays small whatever the data.
    shared: str | None = None
    boot: str | None = None
    parent: int = 0  # the direct parent when it is not ``ppid``: the template that forked us


def _limit_memory(limit: int | None) -> None:
    """Cap private writable memory, so an item that allocates far past the budget gets a
    MemoryError (its own failure) instead of dragging the machine into the OOM killer."""
    if limit is None:
        return
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        _worker_guards.memory_cap = limit
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on this platform
        pass


def lane_main(conn: Any, stderr: Any, setup: WorkerSetup) -> None:
    """The worker process: read tasks from ``conn`` until EOF or an empty message, answer each.

    A task is one message (see ``pack_task``; big items follow as a second); the answer is one. When the
    parent dies (the pipe breaks, or the watch thread sees it), the worker frees the parent's
    shared memory, kills what its items started and exits, without a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    lead_own_group()
    os.register_at_fork(after_in_child=mark_forked)
    parent = setup.parent or setup.ppid  # whose exit ends us; ppid owns the shared memory
    threading.Thread(target=watch_parent, args=(parent, setup.ppid), daemon=True,
                     name="watch-parent").start()
    capture_stderr(stderr)
    _limit_memory(setup.data_limit)
    record = _Record(setup.record_path, setup.slot)
    _main_globals.install()  # the initializer's globals are the tasks' (see _main_globals)
    init_error = _initialize(setup, record)
    std_fds = StdFds()  # after the initializer: what it did to fds 0-2 is what items get
    fns = _FnCache()
    worker = os.getpid()
    while True:
        try:
            message = conn.recv_bytes()
            if not message:
                break
            header, items_blob = unpack_task(message)
            if items_blob is None:
                items_blob = conn.recv_bytes()
        except (EOFError, OSError):  # the parent closed the pipe, or died
            pipe_broken(parent, setup.ppid)
            break
        blob = _handle(header, items_blob, fns, record, init_error, setup)
        if os.getpid() != worker:  # forked where no at-fork hook ran (a C library): never answer
            leave_fork(None)
        try:
            conn.send_bytes(blob)
        except OSError:
            pipe_broken(parent, setup.ppid)
            break
        del message, items_blob, blob
        std_fds.restore()
    flush_std_streams()


def _initialize(setup: WorkerSetup, record: _Record) -> BaseException | None:
    """Run the initializer; its exception is returned (reported on every item, so the pool does
    not respawn-loop). The phase says "initializing" meanwhile: if the initializer kills the
    process (segfault, ``os._exit``), the parent blames the initializer, not an item."""
    if setup.initializer is None and setup.shared is None and setup.boot is None:
        return None
    record.floats[F_START] = time.monotonic()  # first: the parent reads the phase, then this
    record.ints[F_PHASE] = PHASE_INIT
    error: BaseException | None = None
    try:
        if setup.shared is not None:
            _shared.attach(setup.shared)
        initializer, initargs = (_shared.boot(setup.boot) if setup.boot is not None
                                 else (setup.initializer, setup.initargs))
        if initializer is not None:
            initializer(*initargs)
        if forked_children:
            leave_fork(None)
    except BaseException as exc:
        if forked_children:
            leave_fork(exc)
        error = exc
    record.ints[F_PHASE] = PHASE_IDLE
    return error
