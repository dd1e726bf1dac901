"""``stagepool.ProcessPoolExecutor``: the standard library's constructor over an engine of its own,
so that switching an existing program is a one-line import change::

    from stagepool import ProcessPoolExecutor      # was: from concurrent.futures import ...

    with ProcessPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(decode, paths))

Everything but the constructor is the engine's executor view (``_single.ExecutorView``).
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing.context
import weakref
from collections.abc import Callable
from typing import Any

from ._config import check_positive_int
from ._engine import Engine
from ._single import ExecutorView

__all__ = ["ProcessPoolExecutor"]

_live: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()


class ProcessPoolExecutor(ExecutorView):
    """A drop-in for ``concurrent.futures.ProcessPoolExecutor``, run by a stagepool engine that
    it owns: ``shutdown()`` (or the end of a ``with`` block) shuts the engine down, and
    ``executor.engine`` offers the engine's own calls (``map`` with a report, ``imap``, ...).

    * ``max_workers``: the number of worker processes; None plans it from the machine (CPUs,
      affinity and cgroup quotas, as ``Engine(workers="auto")``) where the standard library
      takes ``os.cpu_count()``. ``ValueError`` if it is below 1.
    * ``mp_context``: accepted for compatibility, and not used: workers always start the loky
      way (fork + exec: a fresh interpreter, as with "spawn", so no state forked from the
      parent). Hence ``max_tasks_per_child`` works with a "fork" context too.
    * ``initializer(*initargs)`` runs once in each worker; if it raises, every call fails with
      :class:`InitializerError`, a ``BrokenProcessPool``.
    * ``max_tasks_per_child``: a worker is replaced after this many calls
      (``Engine(max_tasks_per_worker=...)``).

    The deliberate differences from the standard library: a worker that dies fails only the
    call it was running (with :class:`WorkerCrashed`, a ``BrokenProcessPool``), is replaced, and
    the executor keeps serving: it is never "broken". Arguments that cannot be pickled fail
    their own call with :class:`SerializationError` (a ``pickle.PicklingError``).

    At interpreter exit, calls submitted and not yet finished run to the end, whether or not
    ``shutdown(wait=False)`` was called, as with the standard library; if the executor is
    garbage collected without a shutdown, it shuts down without waiting (its calls still run).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
    ) -> None:
        workers = _check_max_workers(max_workers)
        if mp_context is not None and not isinstance(mp_context, multiprocessing.context.BaseContext):
            raise TypeError(f"mp_context must be a multiprocessing context (from "
                            f"multiprocessing.get_context()) or None, not {mp_context!r}")
        check_positive_int(max_tasks_per_child, "max_tasks_per_child", allow_none=True)
        # writable_inputs: a call may change its numpy arguments in place, as with the standard
        # library's private copies (an engine's own calls get read-only ones, see Engine).
        self.engine = Engine(workers=workers, initializer=initializer, initargs=initargs,
                             max_tasks_per_worker=max_tasks_per_child, writable_inputs=True)
        super().__init__(self.engine.submit, self.engine.shutdown)
        weakref.finalize(self, self.engine.shutdown, False).atexit = False
        _live.add(self)
        _finish_at_exit_registered()

    def __repr__(self) -> str:
        return f"<stagepool.ProcessPoolExecutor over {self.engine!r}>"


def _check_max_workers(value: object) -> int | str:
    """``max_workers`` as the engine's ``workers``, refused as the standard library words it."""
    if value is None:
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_workers must be an int >= 1 or None, not {value!r}")
    if value < 1:
        raise ValueError(f"max_workers must be greater than 0, got {value}")
    return value


@functools.cache
def _finish_at_exit_registered() -> None:
    """Registered once, after the first engine started, so it runs before the engines' own exit
    hook (atexit runs last-registered first), which would kill an engine left open."""
    atexit.register(_finish_at_exit)


def _finish_at_exit() -> None:
    """Interpreter exit: an executor left open finishes its calls, as the standard library's."""
    for executor in list(_live):
        executor.shutdown(wait=True)


# Public classes name the package they are imported from, in reprs and tracebacks.
ProcessPoolExecutor.__module__ = "stagepool"
