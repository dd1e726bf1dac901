"""How an ``Engine`` is put together: which backend, with which options, and what each backend
refuses. Pure choices from validated settings; ``Engine.__init__`` calls them in order."""

from __future__ import annotations

import os
from typing import Any

from ._backends import BackendName, BackendOptions
from ._calls import serial_cannot
from ._config import EngineConfig
from ._planning import WorkerPlan
from ._pressure import MemoryWatch, Watermarks
from ._template_boot import discard_early, worker_env

__all__ = ["BACKENDS", "backend_choice", "backend_options", "memory_watch", "refuse_on_serial"]

BACKENDS: tuple[BackendName, ...] = ("local", "serial", "dask")



def backend_choice(backend: object, address: object) -> tuple[BackendName, Any]:
    """The backend's name and, for ``Engine(backend=client)``, the ``distributed.Client``."""
    choices = f"{', '.join(map(repr, BACKENDS))} or a distributed.Client"
    client: Any = None
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {choices}, got {backend!r}")
        name = backend
    elif type(backend).__module__.partition(".")[0] == "distributed":  # checked again there
        name, client = "dask", backend
    else:
        raise TypeError(f"backend must be one of {choices}, not {type(backend).__name__}")
    if address is not None:
        if name != "dask" or client is not None:
            raise ValueError("address= is the dask scheduler to connect to: it needs "
                             "backend='dask' (a Client already knows its scheduler)")
        if not isinstance(address, str) or not address:
            raise TypeError(f"address must be a scheduler address such as "
                            f"'tcp://127.0.0.1:8786', not {address!r}")
    return name, client


def backend_options(config: EngineConfig, plan: WorkerPlan, name: BackendName,
                    workers: int) -> BackendOptions:
    """What the backend is built from: the engine's settings, the workers' environment (BLAS
    threads; a cluster's workers size them from their own host: see _backends._dask) and the
    array size that goes through shared memory (0 where there is no /dev/shm). A backend
    other than the local one closes the template started early for it (``_template_boot``)."""
    from ._shm import available

    if name != "local":  # no template to adopt (see _template_boot): close one started early
        discard_early()
    else:
        check_working_directory()
    env = {} if name == "dask" else plan.thread_env(workers=workers)
    env.update(worker_env())
    return BackendOptions(
        workers, initializer=config.initializer, initargs=config.initargs, env=env,
        max_rss=config.max_rss_per_worker, max_tasks=config.max_tasks_per_worker,
        mem_per_task=config.mem_per_task,
        shm_threshold=config.shm_threshold if available() else 0,
        writable_inputs=config.writable_inputs, init_timeout=config.init_timeout,
        shared=config.shared, preload=config.preload)


def check_working_directory() -> None:
    """Local workers start in this process's working directory: a deleted one (a script run
    from a temporary directory that went away) would fail every worker start deep inside the
    launch, and every item would come back cancelled. Raises ``FileNotFoundError`` saying so."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise FileNotFoundError(
            "Engine(): the current working directory no longer exists (deleted after this "
            "process entered it); local workers start in it: os.chdir() to an existing "
            "directory before Engine()") from None


def refuse_on_serial(config: EngineConfig) -> None:
    """What the serial backend cannot do, refused before the initializer runs in this process."""
    for option, value in (("timeout", config.timeout),
                          ("max_rss_per_worker", config.max_rss_per_worker),
                          ("max_tasks_per_worker", config.max_tasks_per_worker)):
        if value is not None:
            raise ValueError(serial_cannot(option))


def memory_watch(name: BackendName, marks: Watermarks | None) -> MemoryWatch | None:
    """The readings an engine's batches share; none on dask (its workers pause themselves:
    README "Memory pressure")."""
    if marks is None or name == "dask":
        return None
    watch = MemoryWatch(marks)
    watch.reading()  # the first (the cgroup walk) here, not in the first batch
    return watch
