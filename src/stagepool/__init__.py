"""stagepool: a resource-aware, crash-proof process pool for CPU-bound media pipelines.

    import stagepool as sp

    with sp.Engine(mem_per_task="1GiB") as engine:
        report = engine.map(process_segment, segments, progress=True)
    print(report.summary())
"""

from ._engine import Engine
from ._errors import (
    EngineClosed,
    InitializerError,
    RemoteError,
    SerializationError,
    StagepoolError,
    TaskCancelled,
    TaskTimeout,
    WorkerCrashed,
)
from ._outcome import BatchReport, BatchStats, Outcome
from ._progress import Progress
from ._resources import ResourceSnapshot, WorkerPlan, plan_workers

__version__ = "0.1.0"

__all__ = (
    "BatchReport",
    "BatchStats",
    "Engine",
    "EngineClosed",
    "InitializerError",
    "Outcome",
    "Progress",
    "RemoteError",
    "ResourceSnapshot",
    "SerializationError",
    "StagepoolError",
    "TaskCancelled",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPlan",
    "plan_workers",
)
