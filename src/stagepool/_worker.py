"""Everything that runs inside a worker process.

This module is the child side of the pool and imports nothing heavy (no numpy, no psutil, no loky),
so a worker starts fast. One worker runs one chunk at a time:

    parent --(task bytes: chunk id, fn, items, timeouts)--> lane_main --> run_chunk(fn, items)
    parent <--(result bytes: values, timestamps, errors, pid)-----------------/

While it runs, the worker writes *which item it is on* into its slot of a shared record (an mmap of
a memfd owned by the parent). That record is how the parent blames exactly one item when the
worker dies or overruns its timeout: no guessing, no bisection. The write is a single store into
shared memory, cheap enough for items that take a microsecond.

The item loop itself and the record's layout live in ``_worker_loop`` (re-exported here), the
guards against hostile items (forks, closed std fds, descendants, a dead parent) in
``_worker_guards``, the stderr pipe and the stack dump on request in ``_worker_stderr``; functions
pickled by reference (``lane_main``, ``apply_call``, ...) stay here.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any, cast

from . import _main_globals, _shared, _shm, _transport, _worker_guards
from ._wire import TaskHeader, unpack_task
from ._worker_errors import ErrInfo, exc_info, unpicklable
from ._worker_guards import (
    StdFds,
    flush_std_streams,
    forked_children,
    lead_own_group,
    leave_fork,
    mark_forked,
    pipe_broken,
    watch_parent,
)
from ._worker_loop import (  # the item loop; its names are the worker's to the rest
    F_CHUNK,
    F_OFFSET,
    F_PHASE,
    F_START,
    OFFSET_ENCODING,
    OFFSET_FREEING,
    PHASE_DECODE,
    PHASE_ENCODE,
    PHASE_IDLE,
    PHASE_INIT,
    PHASE_RUN,
    RECORD_FIELDS,
    SLOT_STRIDE,
    ChunkResult,
    Record,
    Scratch,
    decoded_result,
    run_chunk,
)
from ._worker_stderr import capture_stderr

__all__ = [
    "FN_CACHE_SIZE", "OFFSET_ENCODING", "OFFSET_FREEING", "PHASE_ENCODE", "PHASE_IDLE",
    "PHASE_INIT", "PHASE_RUN", "RECORD_FIELDS", "SLOT_STRIDE", "ChunkResult", "ErrInfo",
    "Scratch", "WorkerSetup", "apply_call", "call_chunk", "decoded_result", "dumps",
    "encode_result", "failed_chunk", "lane_main", "run_chunk",
]

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: object) -> bytes:
    """Pickle with cloudpickle: as fast as pickle on plain data (measured: 51 vs 47 us for 5,000
    ints), and it also carries lambdas, closures and classes defined in ``__main__``, which a
    worker that did not import the caller's script could not find by reference. Code pickled by
    value keeps its file name, so tracebacks show where it came from (``_transport``)."""
    return _transport.dumps_plain(obj)


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
        return encode((_transport.packed(values), stamps.tobytes(), errors, pid))
    except BaseException:
        pass
    errors = dict(errors or {})
    clean: list[Any] = []
    for offset, value in enumerate(values):
        try:
            dumps(value)
            clean.append(value)
        except BaseException as exc:
            salvaged = _salvaged(value)
            clean.append(salvaged)
            if salvaged is None:
                errors[offset] = unpicklable("the result", value, exc)
    return encode((clean, stamps.tobytes(), errors, pid))


def _salvaged(value: Any) -> Any:
    """What of an unpicklable result can still travel, when the result says
    (``_stagepool_salvage(dumps)``: a pipeline group's result turns its unpicklable stage values
    into those stages' failures, so the stages that ran keep their outcomes); else None."""
    salvage = getattr(value, "_stagepool_salvage", None)
    if salvage is None:
        return None
    try:
        out = salvage(dumps)
        dumps(out)
    except BaseException:
        return None
    return out


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


# A chunk whose items and answer each travelled at most this big keeps its items and results
# until the answer is sent (see _handle): what they hold then is small beside any RSS cap.
FREE_AFTER_BYTES = 1 << 20


def _handle(
    header: TaskHeader, items_blob: bytes | memoryview, fns: _FnCache, record: Record,
    init_error: BaseException | None, setup: WorkerSetup,
) -> tuple[bytes, object]:
    """Run one task; return its answer and what to let go of once the answer is sent: the
    chunk's items and results when both travelled small (``FREE_AFTER_BYTES``, no arrays in
    shared memory). Freeing 10,000 ints took ~60 us each way, and the parent waited for it
    (``lane_main``). Anything bigger is let go of before answering, as before: the parent
    reads the worker's RSS when the answer comes (``max_rss_per_worker``), and
    ``release_inputs`` must see which input arrays the function kept."""
    chunk_id, fn_key, fn_blob, n_items, timed, per_item_clock, budget = header
    kept: object = None
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
                shared_inputs = bool(_shm.segment_names(items_blob))
                readonly = not setup.writable_inputs and (  # some input array is read-only
                    frozen != _transport.read_only_arrays or shared_inputs)
                result = run_chunk(fn, items, record=record, chunk_id=chunk_id, timed=timed,
                                   per_item_clock=per_item_clock, readonly_inputs=readonly,
                                   budget=budget)
                if shared_inputs or len(items_blob) > FREE_AFTER_BYTES:
                    # Every item ran: a death from here on (an argument's finalizer) is not the
                    # last item's fault. The parent halves the chunk to find whose it is.
                    _encoding(record)
                    del items
                    _shm.release_inputs(items_blob)  # before answering: then it may recycle
                else:
                    kept = items
    _encoding(record)
    blob = encode_result(result, setup)
    if len(blob) <= FREE_AFTER_BYTES and not _shm.segment_names(blob):
        ints[F_PHASE] = PHASE_IDLE
        return blob, (kept, result)
    del kept, result  # let go of them now, while the parent still reads "encoding"
    ints[F_PHASE] = PHASE_IDLE
    return blob, None


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
    record = Record(setup.record_path, setup.slot)
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
        blob, done = _handle(header, items_blob, fns, record, init_error, setup)
        _leave_if_forked(worker)  # forked where no at-fork hook ran (a C library): never answer
        try:
            conn.send_bytes(blob)
        except OSError:
            pipe_broken(parent, setup.ppid)
            break
        # The items and results go now, the answer sent. A finalizer that kills the worker
        # here cannot lose or blame an item: the answer is out and no item of the next task
        # has started (its items go out again, their runs uncounted). One that hangs is
        # seen by the parent (OFFSET_FREEING since F_START): it stops waiting at the next
        # task's timeout, and kills and replaces this worker.
        record.floats[F_START] = time.monotonic()  # first: the parent reads the offset first
        record.ints[F_OFFSET] = OFFSET_FREEING
        del message, items_blob, blob, done
        _leave_if_forked(worker)  # a finalizer forked: only the worker may read the next task
        record.ints[F_OFFSET] = -1
        std_fds.restore()
    flush_std_streams()


def _encoding(record: Record) -> None:
    """Say that every item ran and the answer is being made, since now: a death there is no
    one item's (the parent halves the chunk), and a hang there (a ``__reduce__``, an input's
    finalizer) is stopped at the chunk's shortest limit. The phase and time before the offset:
    the parent reads the offset first (``SharedRecord.state``)."""
    record.ints[F_PHASE] = PHASE_ENCODE
    record.floats[F_START] = time.monotonic()
    record.ints[F_OFFSET] = OFFSET_ENCODING


def _leave_if_forked(worker: int) -> None:
    """End a child that a fork left in the worker's loop (its pipe and record are the worker's)."""
    if os.getpid() != worker:
        leave_fork(None)


def _initialize(setup: WorkerSetup, record: Record) -> BaseException | None:
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
