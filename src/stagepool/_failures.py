"""The failure vocabulary shared by batches and single submits: what a dead worker, a worker's
error report or an undecodable answer means for an item, and whether it deserves a retry."""

from __future__ import annotations

import pickle
import signal

from ._backends import LaneDied
from ._dumps import brief, where
from ._errors import (
    InitializerError,
    RemoteError,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    WorkerCrashed,
)
from ._outcome import Kind, RemoteTraceback
from ._remote_types import names_match, remote_error
from ._worker import ErrInfo

__all__ = ["KILLED_BY", "RetryOn", "Subject", "crash_error", "death_failure", "lost_result_error",
           "rebuild_error", "retryable", "unpickled_result_error"]

RetryOn = tuple[str | type[BaseException], ...]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


_CRASH_HINTS = {
    "SIGKILL": "SIGKILL: usually the OOM killer; lower mem_per_task or workers",
    "SIGSEGV": "a segmentation fault, usually a bug in a native extension",
    "SIGBUS": "a bus error, usually a native extension or a truncated memory-mapped file",
    "SIGABRT": "abort(), usually a failed assertion in a native library",
    "SIGTERM": "SIGTERM from outside the engine",
    "SIGFPE": "a floating-point exception in native code",
    "SIGILL": "an illegal instruction in native code",
}


Subject = int | str  # a batch's item index, or what a single call is ("the call f()")


def subject(index: Subject) -> str:
    """How messages name the failed work: "item 3", or a single call by its function."""
    return f"item {index}" if isinstance(index, int) else index


def crash_error(died: LaneDied, index: Subject, stage: str) -> WorkerCrashed:
    """A message that says who died, how, on which item, the likely cause and the stderr tail."""
    code = died.exitcode
    if died.reason == "memory":
        how = "was killed by stagepool: its memory passed twice max_rss_per_worker"
        hint = "the item needs more memory than allowed; raise max_rss_per_worker or split it"
    elif code is not None and code < 0:
        how = f"was killed by {_signal_name(-code)}"
        hint = _CRASH_HINTS.get(_signal_name(-code), "an unexpected signal")
    elif code is not None:
        how = f"exited with code {code}"
        hint = "the task (or a library it called) ended the process, e.g. with os._exit()"
    else:
        how, hint = "died", "unknown cause"
    if died.reason == "initializer":  # the backend starts no new worker: a doomed engine
        stage = f"running the initializer {died.initializer}, before"
        hint += "; no worker is started again and every item fails so: fix the initializer"
    msg = f"{_who(died)} {how} while {stage} {subject(index)}{_ran_for(died)}: {hint}"
    if died.detail:  # a few lines here; the whole tail (the full dump) is the .stderr attribute
        msg += f"\n--- the worker's last words (stderr tail; all of it: .stderr) ---\n{brief(died.detail)}"
    return WorkerCrashed(msg, stderr=died.detail)


def _ran_for(died: LaneDied) -> str:
    return f" (after {died.duration:.2f} s)" if died.duration > 0 else ""


def _who(died: LaneDied) -> str:
    """"worker 123", and where it ran when a pid says little (a cluster worker's address); only
    where, when the pid is not known (0: a dask worker that died under the chunk)."""
    if not died.pid:
        return f"the {died.where}" if died.where else "a worker"
    return f"worker {died.pid}" + (f" ({died.where})" if died.where else "")


# Deaths the engine caused on purpose, and what caused them: an item they end is "cancelled"
# (never retried, never run again: its batch or the engine is over), not a crash.
KILLED_BY = {"cancelled": "its batch was cancelled",
             "shutdown": "the engine was shut down with shutdown(kill=True)"}


def lost_result_error(died: LaneDied, index: Subject, how: str) -> WorkerCrashed | TaskCancelled:
    """``rerun_innocent=False``: ``index`` ran, but its result died with its worker, which went
    ``how`` ("died on item 3", "was retired while running its chunk"); not run again.
    A kill of ours (``KILLED_BY``) is a ``TaskCancelled`` naming its cause instead: nothing can
    run again once the batch or the engine is over."""
    cause = KILLED_BY.get(died.reason)
    if cause is not None:
        return TaskCancelled(f"{subject(index)} ran, but its result was lost when {cause}: "
                             f"{_who(died)} was killed while running its chunk; not run again")
    return WorkerCrashed(f"{subject(index)} ran, but its result was lost when {_who(died)} {how}; "
                         "not run again because rerun_innocent=False")


def death_failure(died: LaneDied, index: Subject, stage: str,
                  seconds: float) -> tuple[Kind, Exception]:
    """What a dead worker means for the item it was running (``seconds``: its timeout)."""
    if died.reason == "timeout":
        hung = where(died.stack)
        return "timeout", TaskTimeout(
            f"{subject(index)} ran longer than its timeout of {seconds:g} s in {_who(died)}"
            f"{_ran_for(died)}" + (f", stuck in {hung}" if hung else "") +
            "; the worker and its child processes were killed and replaced"
            + ("" if hung else " (no Python stack: it could not be dumped)"),
            stack=died.stack)
    if died.reason == "init_timeout":
        return "error", InitializerError(
            f"the initializer {died.initializer} ran longer than init_timeout in worker "
            f"{died.pid} (before {subject(index)}): it was killed with its child processes and no "
            "worker is started again; make it faster, or raise init_timeout (None: no limit)")
    if died.reason == "lost":
        return "crash", lost_result_error(died, index, died.detail or "died after it ended")
    if died.reason in KILLED_BY:
        return "cancelled", TaskCancelled(
            f"{subject(index)} was running when {KILLED_BY[died.reason]}; its worker was killed"
            f"{_ran_for(died)}")
    return "crash", crash_error(died, index, stage)


def retryable(retry_on: RetryOn, kind: Kind, error: BaseException) -> bool:
    """Whether ``retry_on`` names the failure's kind or one of its exception's types (for a
    worker's wrapped ``SystemExit``, say, the type of the original)."""
    errors = (error, error.__cause__) if isinstance(error, RemoteError) else (error,)
    return any(entry == kind or (isinstance(entry, type) and (
        isinstance(err, entry) or names_match(entry, err))) for entry in retry_on for err in errors)


def rebuild_error(info: ErrInfo, index: Subject) -> tuple[Kind, Exception, str]:
    """The exception a worker reported for item ``index``, rebuilt in the parent with the
    worker's traceback as ``__cause__`` (a :class:`RemoteError` when it cannot be rebuilt)."""
    if info.kind in ("serialization", "unpickle"):
        return "serialization", SerializationError(
            f"{subject(index)}: {info.message}", cause=RemoteTraceback(info.traceback)), info.traceback
    error: BaseException | None = None
    if info.blob is not None:
        try:
            error = pickle.loads(info.blob)
        except BaseException:
            error = None
    if not isinstance(error, BaseException):
        error = remote_error(info.type_name, info.message, info.traceback)
    error.__cause__ = RemoteTraceback(info.traceback)
    if not isinstance(error, Exception):
        error = _not_the_callers(error, info)
    return "error", error, info.traceback


def _not_the_callers(original: BaseException, info: ErrInfo) -> RemoteError:
    """A worker's ``KeyboardInterrupt``, ``SystemExit`` (any BaseException that is not an
    Exception) wrapped in a :class:`RemoteError`: raised as itself by ``unwrap()``,
    ``future.result()`` or ``await``, it would pass for the caller's own Ctrl-C or exit and slip
    past ``except Exception``; ``raise_on_failure()`` could not make an ``ExceptionGroup`` of it."""
    shown = f"{info.type_name}: {info.message}" if info.message else info.type_name
    wrapper = RemoteError(
        f"the function raised {shown} in its worker; reported as a RemoteError so that it "
        f"cannot pass for this process's own {info.type_name} (the original is __cause__)",
        type_name=info.type_name, remote_traceback=info.traceback)
    wrapper.__cause__ = original
    return wrapper


def unpickled_result_error(index: Subject, exc: BaseException) -> SerializationError:
    return SerializationError(f"{subject(index)}: its result could not be unpickled in the parent: "
                              f"{type(exc).__name__}: {exc}", cause=exc)
