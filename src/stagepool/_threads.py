"""The thread budget of a worker: how many threads a task may start (``stagepool.worker_threads``).

The engine gives each worker a share of the CPUs (``WorkerPlan.thread_env``: usable CPUs //
workers, or the user's own ``OMP_NUM_THREADS``) and caps BLAS/OpenMP at it through environment
variables. Libraries with their own thread pools do not read those: an FFmpeg decoder (PyAV),
OpenCV and torch default to every core in every worker, so N workers run N x cores threads.
The same budget travels in ``STAGEPOOL_WORKER_THREADS`` so that a task can pass it on.

Inside a worker this reads one environment variable (nothing is imported: a worker stays light);
outside one it asks ``_resources`` for the usable CPUs.
"""

from __future__ import annotations

import os

__all__ = ["ENV_WORKER_THREADS", "worker_threads"]

ENV_WORKER_THREADS = "STAGEPOOL_WORKER_THREADS"


def worker_threads() -> int:
    """The number of threads the calling task may use: inside a stagepool worker, its share of
    the CPUs (the same budget as its BLAS/OpenMP threads); anywhere else (the caller's process,
    the serial backend), the CPUs this process may use (count, affinity, cgroup quota).

    Pass it on to libraries that size their own pools: PyAV ``stream.thread_count``,
    ``cv2.setNumThreads``, ``torch.set_num_threads``. Never less than 1; never raises (a
    malformed variable counts as unset).
    """
    value = os.environ.get(ENV_WORKER_THREADS, "")
    if value.isdigit() and int(value) >= 1:
        return int(value)
    from ._resources import ResourceSnapshot  # psutil: only outside workers

    return max(1, ResourceSnapshot.read().usable_cpus)
