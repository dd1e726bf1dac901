"""The built-in media workload behind ``stagepool demo``: no input files, real CPU-bound numpy work.

A synthetic soundtrack (48 kHz stereo float32: a tone bed, speech-like bursts and background noise)
is cut into segments, each generated on demand from ``(seed, index)`` so memory stays flat however
long the track is. Every segment goes through the same chain of pure numpy stages::

    synth_segment(index)                      parent process, lazily, one segment at a time
      -> validate        NaN / Inf / shape / dtype -> CorruptSegmentError (two segments by design)
      -> to_mono         (n, 2) float32 -> (n,) float64
      -> resample        48 kHz -> 16 kHz: Kaiser-windowed sinc low-pass, polyphase decimation
      -> noise_gate      Hann STFT, per-bin noise floor from the quietest frames, overlap-add
      -> loudness, peak  gated RMS level of the 16 kHz mix
         voice_activity  share of 20 ms frames above an adaptive energy threshold
      -> SegmentFeatures

``process_segment`` runs that chain (``_demo_stages``; the soundtrack and the data types are in
``_demo_synth``). ``run_demo`` here is the only function that prints and the only one that
touches the ``stagepool`` API (lazily).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from ._demo_stages import (
    loudness,
    noise_gate,
    peak_dbfs,
    process_segment,
    resample,
    to_mono,
    validate,
    voice_activity,
)
from ._demo_synth import (
    ANALYSIS_RATE,
    SILENCE_DBFS,
    SOURCE_RATE,
    CorruptSegmentError,
    GateResult,
    Segment,
    SegmentFeatures,
    default_corrupt,
    segment_count,
    soundtrack,
    synth_segment,
)

__all__ = (
    "ANALYSIS_RATE",
    "SILENCE_DBFS",
    "SOURCE_RATE",
    "CorruptSegmentError",
    "GateResult",
    "Segment",
    "SegmentFeatures",
    "default_corrupt",
    "loudness",
    "noise_gate",
    "peak_dbfs",
    "process_segment",
    "resample",
    "run_demo",
    "segment_count",
    "soundtrack",
    "synth_segment",
    "to_mono",
    "validate",
    "voice_activity",
)

# --------------------------------------------------------------------------------------------------
# The demo (the only code that prints or touches the pool)

_MEM_PER_TASK: Final = "64MiB"  # one segment in flight: ~0.8 MB of input, ~5 MB of STFT scratch


class _Failure(Protocol):
    """What ``run_demo`` reads from a failed outcome (``stagepool.Outcome`` has all of it)."""

    @property
    def index(self) -> int: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def kind(self) -> str: ...


class _Stats(Protocol):
    @property
    def wall_time(self) -> float: ...
    @property
    def items_per_second(self) -> float: ...


class _Report(Protocol):
    """What ``run_demo`` reads from a ``stagepool.BatchReport``."""

    @property
    def failed(self) -> Sequence[_Failure]: ...
    @property
    def stats(self) -> _Stats: ...
    def summary(self) -> str: ...
    def __len__(self) -> int: ...


def run_demo(
    *,
    seconds: float = 600.0,
    segment_seconds: float = 2.0,
    workers: int | str = "auto",
    progress: bool = True,
    sample: int = 8,
    out: Callable[[str], None] = print,
    backend: str = "local",
    address: str | None = None,
    pipeline: bool = False,
) -> int:
    """Process a synthetic soundtrack on a stagepool ``Engine`` and print what happened.

    Plans the workers for 64 MiB per segment (``workers="auto"``) or uses ``workers``, maps
    ``process_segment`` over ``soundtrack(seconds=..., segment_seconds=...)``, then prints the
    plan's reason, the report summary, one line per failed segment, throughput, the realtime
    factor and the speedup over running ``process_segment`` serially here (timed on ``sample``
    valid segments after the pool has shut down and extrapolated; ``sample=0`` skips it).

    ``pipeline=True`` runs the chain as a ``stagepool.Pipeline`` of six stages with one
    independent branch (``_demo_pipeline``) and prints its report, with one line per stage.

    ``backend="dask"`` runs it on a dask cluster: the one at ``address``, else an in-process
    ``LocalCluster`` of ``workers`` processes; the plan line then describes the cluster.

    Returns 0 when exactly the deliberately corrupt segments failed, with ``CorruptSegmentError``,
    and 1 otherwise. Raises ``ValueError`` for non-positive durations or a negative ``sample``.

    Cancellation and shutdown: a ``KeyboardInterrupt`` during the batch propagates out of
    ``engine.map``; leaving the ``with`` block shuts the engine and its workers down before it
    reaches the caller, and nothing more is printed. The serial measurement runs in this process.
    """
    import stagepool as sp

    count = segment_count(seconds, segment_seconds)
    segment_seconds = min(segment_seconds, seconds)  # a segment is at most the whole track
    if sample < 0:
        raise ValueError(f"sample must be >= 0 segments, got {sample!r}")
    corrupt = default_corrupt(count)
    # A cluster at an address brings its own workers: "auto" lets the engine ask it.
    with sp.Engine(workers="auto" if address else workers, mem_per_task=_MEM_PER_TASK,
                   backend=backend, address=address) as engine:
        out(f"plan: {engine.plan.reason}")
        out(_workload_line(count, seconds, segment_seconds, corrupt))
        # Warm-up: start every worker and import this module there, so the measured batch is
        # the steady state a long-running service sees, not interpreter start-up.
        warm = synth_segment(0, segment_seconds=segment_seconds)
        engine.map(process_segment, [warm] * (2 * engine.workers), chunk_size=1)
        if pipeline:
            return _run_pipeline(engine, count, seconds, segment_seconds, corrupt, progress, out)
        report: _Report = engine.map(
            process_segment,
            soundtrack(seconds=seconds, segment_seconds=segment_seconds),
            progress=progress,
            desc="segments",
            size=_segment_seconds,  # the bar counts seconds of audio, with the realtime factor
        )
    _print_report(report, seconds, out)
    if sample:
        serial = _serial_seconds_per_segment(sample, count, segment_seconds, corrupt)
        out(_speedup_line(serial, sample, len(report), report.stats.wall_time))
    return 0 if _only_expected_failures(report.failed, corrupt) else 1


def _run_pipeline(engine: Any, count: int, seconds: float, segment_seconds: float,
                  corrupt: frozenset[int], progress: bool, out: Callable[[str], None]) -> int:
    """``--pipeline``: the stages as a DAG on the same engine; its report, stage by stage."""
    from ._demo_pipeline import demo_pipeline

    report = engine.run(demo_pipeline(), soundtrack(seconds=seconds,
                                                    segment_seconds=segment_seconds),
                        progress=progress, desc="segments")
    out(report.summary())
    wall = max(report.wall_time, 1e-9)
    out(f"throughput: {count / wall:.1f} segments/s")
    out(f"realtime factor: {seconds / wall:.1f}x ({seconds:g} s of audio in {wall:.2f} s)")
    failed = report.failed
    return 0 if _only_expected_failures(failed, corrupt) and \
        all(f.stage == "decode" for f in failed) else 1
def _segment_seconds(segment: Segment) -> float:
    return segment.duration_s


def _workload_line(count: int, seconds: float, segment_seconds: float, bad: frozenset[int]) -> str:
    corrupt = ", ".join(str(i) for i in sorted(bad)) or "none"
    return (
        f"workload: {seconds:g} s of 48 kHz stereo in {count} segments of {segment_seconds:g} s; "
        f"corrupt on purpose: {corrupt}"
    )


def _print_report(report: _Report, seconds: float, out: Callable[[str], None]) -> None:
    """Summary, one line per failure, throughput and realtime factor."""
    out(report.summary())  # counts, then each failure with its item index and cause
    wall = max(report.stats.wall_time, 1e-9)
    out(f"throughput: {report.stats.items_per_second:.1f} segments/s")
    out(f"realtime factor: {seconds / wall:.1f}x ({seconds:g} s of audio in {wall:.2f} s)")


def _serial_seconds_per_segment(
    sample: int, count: int, segment_seconds: float, bad: frozenset[int]
) -> float:
    """Wall time of ``process_segment`` on up to ``sample`` valid segments, here, per segment."""
    indices = [i for i in range(count) if i not in bad][:sample]
    segments = [synth_segment(i, segment_seconds=segment_seconds) for i in indices]
    process_segment(segments[0])  # warm-up: filter design caches, first-call allocations
    start = time.perf_counter()
    for segment in segments:
        process_segment(segment)
    return (time.perf_counter() - start) / len(segments)


def _speedup_line(serial: float, sample: int, count: int, wall_time: float) -> str:
    """Serial time extrapolated to the whole batch, over the pool's wall time."""
    total = serial * count
    return (
        f"speedup over serial: {total / max(wall_time, 1e-9):.2f}x "
        f"(serial {serial * 1000:.1f} ms/segment over {min(sample, count)} segments "
        f"-> {total:.1f} s for {count}; pool {wall_time:.2f} s)"
    )


def _only_expected_failures(failed: Sequence[_Failure], corrupt: frozenset[int]) -> bool:
    """True when the failures are exactly the corrupt segments, each rejected by validation."""
    indices = {failure.index for failure in failed}
    rejected = all(isinstance(failure.error, CorruptSegmentError) for failure in failed)
    return indices == corrupt and rejected


# The public names say they come from here (tracebacks, profiles, pickles by reference).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", __name__).startswith("stagepool._demo"):
        _obj.__module__ = __name__
