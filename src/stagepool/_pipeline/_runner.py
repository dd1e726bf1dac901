"""The worker side of a pipeline: one group's stages for one segment, as one task item.

    Carry (values the group reads, stages already failed upstream)
      -> GroupRunner(carry) in the worker: for each stage, in topological order
            skipped if an input failed (the record names the root cause), else
            breadcrumb "stage i is running" -> setup (once per worker) -> fn(*inputs, ctx=)
            -> retries of its errors -> its own timeout checked -> a StageRecord
      -> GroupResult (the values later groups or the caller need, one record per stage)

A stage's failure is a value here, so the engine sees an "ok" item and the segment's other
branches go on. What the runner cannot catch (its worker dies, or the group's hard timeout
kills it) is the engine's outcome for the whole item; the breadcrumb file tells the parent which
stage was running then (``_translate``).

Imported in workers: nothing heavy (no numpy, no psutil, no engine).
"""

from __future__ import annotations

import atexit
import dataclasses
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .._errors import InitializerError, TaskTimeout
from .._worker_errors import ErrInfo, exc_info, unpicklable

__all__ = ["Carry", "GroupResult", "GroupRunner", "StageCall", "StageRecord"]


class Carry(NamedTuple):
    """What a group's task item holds for one segment."""

    values: dict[str, Any]  # outputs the group reads (INPUT: the segment itself)
    blocked: dict[str, str]  # stages already failed or skipped upstream -> the failing stage
    segment: int = -1  # its index, which the breadcrumb names (see ``dead_runs``)


class StageRecord(NamedTuple):
    """How one stage went for one segment (errors packed as the worker packs item errors)."""

    kind: str  # ok / error / timeout / skipped / serialization (its value would not travel)
    error: ErrInfo | None
    duration: float
    attempts: int
    cause: str | None  # for "skipped": the stage whose failure it follows


class GroupResult(NamedTuple):
    values: dict[str, Any]  # only what later groups read, and the leaves
    records: dict[str, StageRecord]

    def _stagepool_salvage(self, dumps: Callable[[object], bytes]) -> GroupResult:
        """This result without the values that cannot be pickled, each one's stage failed
        with kind "serialization" (the worker sends this when the whole result would not go:
        the group's other stages ran and keep their outcomes; readers of a dropped value, in
        later groups, are skipped because of its stage)."""
        values, records = dict(self.values), dict(self.records)
        for name, value in self.values.items():
            try:
                dumps(value)
            except Exception as exc:
                del values[name]
                ran = records[name]
                records[name] = ran._replace(
                    kind="serialization",
                    error=unpicklable(f"the value of stage {name!r}", value, exc))
        return GroupResult(values, records)


@dataclasses.dataclass(frozen=True, slots=True)
class StageCall:
    """One stage as the worker runs it."""

    name: str
    fn: Callable[..., Any]
    after: tuple[str, ...]
    timeout: float | None
    retries: int
    retry_types: tuple[type[BaseException], ...]  # the exception types worth a retry
    retry_all: bool  # "error" in retry_on: any exception
    backoff: float
    setup: Callable[[], Any] | None
    teardown: Callable[[Any], object] | None


@dataclasses.dataclass(frozen=True, slots=True)
class GroupRunner:
    """The task function of one group: called by the worker with a :class:`Carry`."""

    uid: str  # the pipeline's identity: setup results are cached by (uid, stage)
    stages: tuple[StageCall, ...]
    emit: frozenset[str]  # outputs the parent needs back
    crumbs: str | None  # the run's breadcrumb directory (None: in-process, nobody needs it)
    group: int = 0  # the group's position in the run, which the breadcrumb names

    def __repr__(self) -> str:  # what a message naming "the function" shows: the user's stages
        return "<pipeline stages " + ", ".join(f"{c.name}={c.fn!r}" for c in self.stages) + ">"

    def __call__(self, carry: Carry) -> GroupResult:
        # A group of one stage needs no breadcrumb: the parent knows which stage it ran.
        crumbs = self.crumbs if len(self.stages) > 1 else None
        values, blocked = dict(carry.values), dict(carry.blocked)
        records: dict[str, StageRecord] = {}
        _crumb_start(crumbs, self.group, carry.segment, len(self.stages))
        for i, stage in enumerate(self.stages):
            cause = next((blocked[dep] for dep in stage.after if dep in blocked), None) \
                if blocked else None
            if cause is not None:
                records[stage.name] = StageRecord("skipped", None, 0.0, 0, cause)
                blocked[stage.name] = cause
                continue
            _crumb(crumbs, self.group, carry.segment, i)
            record, value = _run_stage(self.uid, stage, [values[d] for d in stage.after or ("",)],
                                       crumbs, i)
            records[stage.name] = record
            if record.kind == "ok":
                values[stage.name] = value
            else:
                blocked[stage.name] = stage.name
            _crumb_ended(crumbs, i, record)
        _crumb(crumbs, self.group, carry.segment, -1)
        return GroupResult({k: v for k, v in values.items() if k in self.emit}, records)


def _run_stage(uid: str, stage: StageCall, args: list[Any], crumbs: str | None = None,
               at: int = 0) -> tuple[StageRecord, Any]:
    """Run one stage (position ``at`` in its group) with its retries, each noted in the
    breadcrumb; its failure is a record, never an exception."""
    try:
        kwargs = {} if stage.setup is None else {"ctx": _context(uid, stage)}
    except BaseException as exc:
        return StageRecord("error", exc_info("error", exc), 0.0, 0, None), None
    attempt = 0
    while True:
        attempt += 1
        start = time.perf_counter()
        try:
            value = stage.fn(*args, **kwargs)
        except BaseException as exc:
            duration = time.perf_counter() - start
            if attempt <= stage.retries and (stage.retry_all or isinstance(exc, stage.retry_types)):
                del exc
                time.sleep(stage.backoff * 2 ** (attempt - 1))
                _crumb_slot(crumbs, at, (attempt + 1) << 2)  # running again: its runs so far
                continue
            return StageRecord("error", exc_info("error", exc), duration, attempt, None), None
        duration = time.perf_counter() - start
        if stage.timeout is not None and duration > stage.timeout:
            late = TaskTimeout(f"stage {stage.name!r} ran {duration:.3g} s, longer than its "
                               f"timeout of {stage.timeout:g} s; its value was dropped")
            return StageRecord("timeout", exc_info("error", late), duration, attempt, None), None
        return StageRecord("ok", None, duration, attempt, None), value


# ---- per-worker state: setups and the breadcrumb -------------------------------------------------

_contexts: dict[tuple[str, str], Any] = {}


class _SetupFailed(NamedTuple):
    error: InitializerError


def _context(uid: str, stage: StageCall) -> Any:
    """The stage's setup value in this worker, made at its first run here; a failed setup is
    remembered, so every later run here fails the same way instead of trying again."""
    key = (uid, stage.name)
    if key not in _contexts:
        try:
            _contexts[key] = value = stage.setup()  # type: ignore[misc]
        except BaseException as exc:
            error = InitializerError(f"the setup of stage {stage.name!r} failed in worker "
                                     f"{os.getpid()}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            _contexts[key] = _SetupFailed(error)
        else:
            if stage.teardown is not None:
                _at_exit(stage.name, stage.teardown, value)
    ctx = _contexts[key]
    if isinstance(ctx, _SetupFailed):
        raise ctx.error
    return ctx


def _at_exit(name: str, teardown: Callable[[Any], object], value: Any) -> None:
    """Tear down when the worker ends normally. A pool worker leaves through multiprocessing's
    exit function (atexit is skipped by ``os._exit``); an in-process run, at interpreter exit.
    A teardown that raises is written to stderr, one line naming the stage (a pool worker's
    stderr is the ``stagepool.worker`` log), and the exit goes on."""
    done: list[bool] = []

    def once() -> None:
        if not done:
            done.append(True)
            try:
                teardown(value)
            except Exception as exc:  # a teardown's failure must not change the exit code
                print(f"stagepool: the teardown of stage {name!r} failed in worker {os.getpid()}: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    from multiprocessing import util

    util.Finalize(None, once, exitpriority=10)
    atexit.register(once)


_crumb_file: list[Any] = [None, None]  # [directory, mmap]: one breadcrumb per worker
# A forked child is another worker: it opens its own file (named by its own pid).
os.register_at_fork(after_in_child=lambda: _crumb_file.__setitem__(slice(None), [None, None]))


# A breadcrumb: group, segment, stage in the group (-1: none running), then one slot per stage
# of the group saying how it ended in this run: runs << 2 | 1 (ok) or | 2 (failed); runs << 2
# for the running stage once retried in the worker; 0: not run (yet), or skipped. Per stage,
# not a bit mask: a mask of 63 stages left the later ones of a longer group unsaid, and said
# nothing of a stage's retries in the worker.
_HEAD = struct.Struct("qqq")
_SLOT = struct.Struct("q")
_OK, _FAILED = 1, 2


class Crumb(NamedTuple):
    """What a worker's breadcrumb says of the stage it was running (see ``read_crumb``)."""

    stage: int  # the stage's position in the group
    # per stage before it: ("ok" | "failed", runs) as it ended in this run; ("", 0) not ended
    ended: tuple[tuple[str, int], ...]


def _crumb_start(directory: str | None, group: int, segment: int, n_stages: int) -> None:
    """A new run of the group for ``segment``: no stage running, none ended."""
    if directory is None:
        return
    size = _HEAD.size + n_stages * _SLOT.size
    mapped = _crumb_file[1]
    if _crumb_file[0] != directory or (mapped is not None and len(mapped) < size):
        mapped = _open_crumb(directory, size)
    if mapped is not None:
        mapped[:size] = _HEAD.pack(group, segment, -1) + bytes(size - _HEAD.size)


def _crumb(directory: str | None, group: int, segment: int, stage: int) -> None:
    """Note which stage runs now in this worker's breadcrumb (``directory/<pid>``), so the
    parent can name it when the worker dies or is killed mid-stage, and count what ran.

    The file is mapped (MAP_SHARED): a note is a store into the page cache, which outlives the
    process, not a system call (a pwrite per stage cost more than a small stage itself)."""
    if directory is not None and _crumb_file[1] is not None:
        _HEAD.pack_into(_crumb_file[1], 0, group, segment, stage)


def _crumb_ended(directory: str | None, i: int, record: StageRecord) -> None:
    """Note how stage ``i`` ended and after how many runs (its records die with the worker)."""
    _crumb_slot(directory, i, record.attempts << 2 | (_OK if record.kind == "ok" else _FAILED))


def _crumb_slot(directory: str | None, i: int, slot: int) -> None:
    if directory is not None and _crumb_file[1] is not None:
        _SLOT.pack_into(_crumb_file[1], _HEAD.size + i * _SLOT.size, slot)


def _open_crumb(directory: str, size: int) -> Any:
    """Map this worker's breadcrumb, at least ``size`` bytes (None: it cannot be written)."""
    old = _crumb_file[1]
    if old is not None:
        old.close()
    try:
        fd = os.open(os.path.join(directory, str(os.getpid())),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            mapped: Any = mmap.mmap(fd, size)
        finally:
            os.close(fd)
    except (OSError, ValueError):  # another host (a remote cluster): the parent will say "one of"
        mapped = None
    _crumb_file[:] = [directory, mapped]
    return mapped


def read_crumb(directory: str, pid: int | None, group: int, segment: int) -> Crumb | None:
    """In the parent: the stage of ``group`` the worker ``pid`` was running for ``segment``
    when it stopped, and how the stages before it ended, if it said (None: it said nothing, or
    was on another segment)."""
    if pid is None:
        return None
    crumb = _read_crumb(os.path.join(directory, str(pid)))
    if crumb is None or crumb[:2] != (group, segment) or crumb[2] < 0:
        return None
    slots = crumb[3 : 3 + crumb[2]]
    return Crumb(crumb[2], tuple(_ended(slot) for slot in slots))


def _ended(slot: int) -> tuple[str, int]:
    how = slot & 3
    return ("ok" if how == _OK else "failed" if how == _FAILED else "", slot >> 2)


def dead_runs(directory: str, group: int, segment: int, n_stages: int) -> list[list[int]]:
    """In the parent, once ``segment`` is done with ``group``: for each worker that died or was
    killed while running it there (its breadcrumb still names a stage), how often each stage of
    the group ran in that run: as its slot says before the stage it died in, at least once for
    that one, none after it."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    crumbs = (_read_crumb(os.path.join(directory, name)) for name in names)
    return [_stage_runs(c, n_stages) for c in crumbs
            if c is not None and c[:2] == (group, segment) and c[2] >= 0]


def _stage_runs(crumb: tuple[int, ...], n_stages: int) -> list[int]:
    at, slots = crumb[2], crumb[3 : 3 + n_stages]
    runs = [slot >> 2 if j < at else max(1, slot >> 2) if j == at else 0
            for j, slot in enumerate(slots)]
    return runs + [0] * (n_stages - len(runs))  # a file cut short: those stages said nothing


def _read_crumb(path: str) -> tuple[int, ...] | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < _HEAD.size or len(data) % _SLOT.size:
        return None
    return struct.unpack(f"{len(data) // _SLOT.size}q", data)
