"""stagepool: a resource-aware, crash-proof process pool for CPU-bound media pipelines.

    import stagepool as sp

    with sp.Engine(mem_per_task="1GiB") as engine:
        report = engine.map(process_segment, segments, progress=True)
    print(report.summary())

Public names are loaded on first use (PEP 562): a worker process imports ``stagepool._worker``,
which runs this file, and must not pay for numpy, psutil and the engine it never uses. The first
use of ``Engine`` also starts the local workers' template process, so that it boots while the
engine is imported (``_template_boot``: adopted by the first local Engine, gone after 30 s idle).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._aio import OutcomeStream
    from ._engine import Engine
    from ._errors import (
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
    )
    from ._executor import ProcessPoolExecutor
    from ._options import EngineView
    from ._outcome import BatchReport, BatchStats, Outcome
    from ._pipeline._async import SegmentStream
    from ._pipeline._declare import Pipeline
    from ._pipeline._report import (
        PipelineAborted,
        PipelineReport,
        SegmentOutcome,
        StageOutcome,
        StageStats,
    )
    from ._planning import WorkerPlan, plan_workers
    from ._profile_file import load_profile
    from ._profiling import StageProfile, profile_stage
    from ._progress import Progress, StageProgress
    from ._resources import ResourceSnapshot
    from ._shared import shared
    from ._status import WorkerStatus
    from ._threads import worker_threads

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "BatchReport": "._outcome",
    "BatchStats": "._outcome",
    "CheckpointError": "._errors",
    "Engine": "._engine",
    "EngineClosed": "._errors",
    "EngineView": "._options",
    "InitializerError": "._errors",
    "Outcome": "._outcome",
    "OutcomeStream": "._aio",
    "OvercommitWarning": "._errors",
    "Pipeline": "._pipeline._declare",
    "PipelineAborted": "._pipeline._report",
    "PipelineReport": "._pipeline._report",
    "ProcessPoolExecutor": "._executor",
    "Progress": "._progress",
    "RemoteError": "._errors",
    "ResourceSnapshot": "._resources",
    "SegmentOutcome": "._pipeline._report",
    "SegmentStream": "._pipeline._async",
    "SerializationError": "._errors",
    "StageOutcome": "._pipeline._report",
    "StageProfile": "._profiling",
    "StageProgress": "._progress",
    "StageStats": "._pipeline._report",
    "StagepoolError": "._errors",
    "TaskCancelled": "._errors",
    "TaskTimeout": "._errors",
    "WorkerCrashed": "._errors",
    "WorkerPlan": "._planning",
    "WorkerStatus": "._status",
    "load_profile": "._profile_file",
    "plan_workers": "._planning",
    "profile_stage": "._profiling",
    "shared": "._shared",
    "worker_threads": "._threads",
}

__all__ = (
    "BatchReport",
    "BatchStats",
    "CheckpointError",
    "Engine",
    "EngineClosed",
    "EngineView",
    "InitializerError",
    "Outcome",
    "OutcomeStream",
    "OvercommitWarning",
    "Pipeline",
    "PipelineAborted",
    "PipelineReport",
    "ProcessPoolExecutor",
    "Progress",
    "RemoteError",
    "ResourceSnapshot",
    "SegmentOutcome",
    "SegmentStream",
    "SerializationError",
    "StageOutcome",
    "StageProfile",
    "StageProgress",
    "StageStats",
    "StagepoolError",
    "TaskCancelled",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPlan",
    "WorkerStatus",
    "load_profile",
    "plan_workers",
    "profile_stage",
    "shared",
    "worker_threads",
)


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stagepool' has no attribute {name!r}")
    if name == "Engine":
        from ._template_boot import start_early

        start_early()
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
