"""The exception hierarchy. Every message says what happened, the likely cause and the fix.

Item failures are normally *values* (an :class:`~stagepool.Outcome` of kind ``"error"``, ``"crash"``,
...). These classes are what ``outcome.error`` holds for failures that did not come from the user's
function itself, and what ``outcome.unwrap()`` / ``report.raise_on_failure()`` raise.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "CheckpointError",
    "EngineClosed",
    "InitializerError",
    "OvercommitWarning",
    "RemoteError",
    "SerializationError",
    "StagepoolError",
    "TaskCancelled",
    "TaskTimeout",
    "WorkerCrashed",
]


class StagepoolError(Exception):
    """Base class of every error stagepool raises or reports itself."""


class _Rebuildable(StagepoolError):
    """An error that pickles by its message (and its attributes), so it crosses process
    boundaries intact."""

    def __reduce__(self) -> tuple[type, tuple[str], dict[str, Any] | None]:
        return (type(self), (str(self),), dict(self.__dict__) or None)


class SerializationError(_Rebuildable, pickle.PicklingError):
    """The function, an argument or a result could not be pickled or unpickled.

    The message names the item index, the object's type and the pickling error; ``__cause__`` is
    the original exception (or, when it happened in a worker, the worker's traceback). A
    ``pickle.PicklingError``, so ``except PicklingError`` written for the standard library's
    executors still catches it. Fix: make the object picklable (module-level functions and
    classes, no open files, locks or sockets), or build it inside the worker from something that is.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.__cause__ = cause


class WorkerCrashed(_Rebuildable, BrokenProcessPool):
    """The worker process died while running this item (segfault, ``os._exit``, a signal, OOM).

    Only the item that was running is blamed; the rest of its chunk ran again elsewhere. A
    ``concurrent.futures.process.BrokenProcessPool`` (as loky's ``TerminatedWorkerError`` is), so
    handlers written for the standard library still catch a dead worker; but the engine is not
    broken: the worker is replaced and every other call runs.

    The message is short: how it died, on which item, the likely cause and a few lines of what
    the worker wrote last (for a segfault, the innermost frames of faulthandler's dump).
    ``stderr`` is the whole tail of the worker's stderr (up to 16 KiB: the full dump, the
    "Extension modules" list included); "" when the backend keeps none.
    """

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class TaskTimeout(_Rebuildable, TimeoutError):
    """The item ran longer than its ``timeout``; its worker (and that worker's children) was killed.

    Before the kill the worker dumps its Python stack (faulthandler): the message names the
    innermost frame of the item ("where it hung") and how long it ran; ``stack`` holds the whole
    dump, every thread (also the outcome's ``traceback``); "" when the worker could not dump it
    (stuck outside Python's reach, or a backend without it).
    """

    def __init__(self, message: str, *, stack: str = "") -> None:
        super().__init__(message)
        self.stack = stack


class TaskCancelled(_Rebuildable):
    """The item never ran to completion because its batch or the engine was cancelled."""


class InitializerError(_Rebuildable, BrokenProcessPool):
    """The engine's ``initializer`` raised in the worker; every item it would run fails with this.

    The worker stays up (no respawn storm); fix the initializer and start a new engine. A
    ``BrokenProcessPool``, which is what the standard library's executors raise for a failed
    initializer.
    """


class EngineClosed(StagepoolError, RuntimeError):
    """Work was submitted to an engine that has been shut down."""


class RemoteError(_Rebuildable):
    """An exception raised in the worker that could not, or must not, be sent back as itself.

    Happens when the exception's class cannot be pickled or rebuilt (for example an ``__init__``
    that requires two arguments). ``type_name``, ``message`` and ``remote_traceback`` keep what is
    known of the original.

    A function that raises ``KeyboardInterrupt``, ``SystemExit`` or any other ``BaseException``
    that is not an ``Exception`` is reported with this error too, the original as ``__cause__``:
    raised as itself in the caller, a worker's Ctrl-C or exit would pass for the caller's own
    and escape ``except Exception``. ``retry_on`` entries match the original's type: for an
    exception that could not be rebuilt, by the qualified names of its classes (``type_names``,
    its MRO, recorded in the worker).
    """

    def __init__(self, message: str, *, type_name: str = "", remote_traceback: str = "",
                 type_names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.type_names = type_names

    def __reduce__(self) -> tuple[type, tuple[str], dict[str, Any]]:
        return (type(self), (self.message,), {
            "type_name": self.type_name, "remote_traceback": self.remote_traceback,
            "type_names": self.type_names,
        })

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        self.__dict__.update(state or {})


class CheckpointError(StagepoolError, ValueError):
    """A ``checkpoint=`` directory cannot serve this call: not writable, written for another
    function or other keys (``checkpoint_mismatch=`` says what to do then), corrupt, or in use
    by another running batch. Raised at the call, before any item runs; the message names the
    path and the fix, an ``OSError`` behind it is the ``__cause__``."""


class OvercommitWarning(UserWarning):
    """Explicit settings ask for more than the machine allows: ``Engine(workers=N,
    mem_per_task=...)`` where N tasks of that size do not fit in the available memory.

    The engine still starts N workers (you insisted); expect swapping or the OOM killer. The
    warning points at the line that created the engine. Fix: ``workers="auto"``, fewer workers or
    a smaller ``mem_per_task``; or silence it with
    ``warnings.filterwarnings("ignore", category=stagepool.OvercommitWarning)``.
    """


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (
    CheckpointError,
    EngineClosed,
    InitializerError,
    OvercommitWarning,
    RemoteError,
    SerializationError,
    StagepoolError,
    TaskCancelled,
    TaskTimeout,
    WorkerCrashed,
):
    _public.__module__ = "stagepool"
