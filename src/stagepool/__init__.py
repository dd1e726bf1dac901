"""stagepool: a resource-aware, crash-proof process pool for CPU-bound media pipelines.

    import stagepool as sp

    with sp.Engine(mem_per_task="1GiB") as engine:
        report = engine.map(process_segment, segments, progress=True)
    print(report.summary())

Public names are loaded on first use (PEP 562): a worker process imports ``stagepool._worker``,
which runs this file, and must not pay for numpy, psutil and the engine it never uses.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._aio import OutcomeStream
    from ._engine import Engine
    from ._errors import (
        EngineClosed,
        InitializerError,
        OvercommitWarning,
        RemoteError,
        SerializationError,
        StagepoolError,
        TaskCancelled,
        TaskTimeout,
        WorkerCrashed,
    )
    from ._executor import ProcessPoolExecutor
    from ._outcome import BatchReport, BatchStats, Outcome
    from ._planning import WorkerPlan, plan_workers
    from ._profile_file import load_profile
    from ._profiling import StageProfile, profile_stage
    from ._progress import Progress
    from ._resources import ResourceSnapshot
    from ._status import WorkerStatus

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "BatchReport": "._outcome",
    "BatchStats": "._outcome",
    "Engine": "._engine",
    "EngineClosed": "._errors",
    "InitializerError": "._errors",
    "Outcome": "._outcome",
    "OutcomeStream": "._aio",
    "OvercommitWarning": "._errors",
    "ProcessPoolExecutor": "._executor",
    "Progress": "._progress",
    "RemoteError": "._errors",
    "ResourceSnapshot": "._resources",
    "SerializationError": "._errors",
    "StageProfile": "._profiling",
    "StagepoolError": "._errors",
    "TaskCancelled": "._errors",
    "TaskTimeout": "._errors",
    "WorkerCrashed": "._errors",
    "WorkerPlan": "._planning",
    "WorkerStatus": "._status",
    "load_profile": "._profile_file",
    "plan_workers": "._planning",
    "profile_stage": "._profiling",
}

__all__ = (
    "BatchReport",
    "BatchStats",
    "Engine",
    "EngineClosed",
    "InitializerError",
    "Outcome",
    "OutcomeStream",
    "OvercommitWarning",
    "ProcessPoolExecutor",
    "Progress",
    "RemoteError",
    "ResourceSnapshot",
    "SerializationError",
    "StageProfile",
    "StagepoolError",
    "TaskCancelled",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPlan",
    "WorkerStatus",
    "load_profile",
    "plan_workers",
    "profile_stage",
)


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stagepool' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
