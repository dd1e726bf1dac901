"""An Engine dropped without ``shutdown()``: release its workers when it is garbage-collected.

The engine's threads (the local pool thread, the dask dispatcher) hold the backend, never the
engine, so an engine nobody references is collected like any object; what it owned would then
live on until interpreter exit (workers, the pool thread, shared memory). As CPython's
``ProcessPoolExecutor`` does with the weakref its manager thread holds, a dropped engine is shut
down without waiting: queued and running work finishes (futures already handed out still get
their results), then the workers exit and the shared memory is unlinked. A ``ResourceWarning``
says so, as an unclosed file or socket does.

A finalizer may run in the middle of any thread holding any lock (the pool thread's included),
so it does not call ``shutdown`` itself: it puts the backend on a ``SimpleQueue`` (whose ``put``
is safe from finalizers) read by one reaper thread, started with the first engine.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["release_when_dropped"]

_dropped: queue.SimpleQueue[Backend] = queue.SimpleQueue()
_reaper: threading.Thread | None = None
_reaper_lock = threading.Lock()


def release_when_dropped(engine: object, backend: Backend, describe: str) -> weakref.finalize[..., object]:
    """Shut ``backend`` down (without waiting) once ``engine`` is garbage-collected; the caller
    detaches the returned finalizer when it shuts down itself. Not at interpreter exit: the
    backends' own exit handlers deal with engines left open then."""
    _start_reaper()
    finalizer = weakref.finalize(engine, _dropped_engine, backend, describe, os.getpid())
    finalizer.atexit = False
    return finalizer


def _dropped_engine(backend: Backend, describe: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child's copy: the workers are not its own
        return
    _dropped.put(backend)  # first: warnings turned into errors must not keep them alive
    warnings.warn(
        f"a stagepool.Engine ({describe}) was garbage-collected without shutdown(); its "
        "workers are being released: use 'with stagepool.Engine() as engine:' or call "
        "engine.shutdown()", ResourceWarning, stacklevel=1)


def _start_reaper() -> None:
    global _reaper
    with _reaper_lock:
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap, name="stagepool-reaper", daemon=True)
            _reaper.start()


def _reap() -> None:
    while True:
        backend = _dropped.get()
        try:
            backend.shutdown(wait=False)
        except Exception as exc:  # one engine's failure must not stop the reaper
            warnings.warn(f"stagepool: releasing a dropped engine failed: {exc!r}",
                          RuntimeWarning, stacklevel=1)
        del backend  # do not keep the last one alive while waiting for the next


def _forget_reaper_after_fork() -> None:
    """In a forked child the reaper thread does not exist: the next engine starts a new one."""
    global _reaper, _reaper_lock, _dropped
    _reaper, _reaper_lock, _dropped = None, threading.Lock(), queue.SimpleQueue()


os.register_at_fork(after_in_child=_forget_reaper_after_fork)
