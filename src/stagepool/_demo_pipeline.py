"""The demo's media stages as a pipeline (``stagepool demo --pipeline``): the same chain as
``process_segment``, cut into stages with one independent branch::

    decode (validate, to_mono) -> resample -> levels (loudness, peak) ---------------> features
                                           \\-> gate (noise_gate) -> activity (VAD) -/

Each stage is a module-level function of the stages it reads; all of them fuse into one task
per segment, so the 48 kHz mix and the gated signal never leave the worker. A corrupt segment
fails in ``decode`` and its later stages are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._demo_stages import (
    _energy_ratio,
    loudness,
    noise_gate,
    peak_dbfs,
    resample,
    to_mono,
    validate,
    voice_activity,
)
from ._demo_synth import ANALYSIS_RATE, GateResult, Segment, SegmentFeatures, Signal

__all__ = ["demo_pipeline"]


class Track(NamedTuple):
    """A segment's identity and its audio at ``rate``."""

    index: int  # type: ignore[assignment]  # the field hides tuple.index, on purpose
    start_s: float
    duration_s: float
    rate: int
    samples: Signal


def decode(seg: Segment) -> Track:
    return Track(seg.index, seg.start_s, seg.duration_s, seg.sample_rate,
                 to_mono(validate(seg)))


def resample_track(track: Track) -> Track:
    return track._replace(rate=ANALYSIS_RATE,
                          samples=resample(track.samples, track.rate, ANALYSIS_RATE))


def levels(track: Track) -> tuple[float, float]:
    return loudness(track.samples, track.rate), peak_dbfs(track.samples)


def gate(track: Track) -> GateResult:
    return noise_gate(track.samples, track.rate)


def activity(track: Track, gated: GateResult) -> tuple[float, float, float]:
    return (voice_activity(gated.samples, track.rate), gated.noise_floor_dbfs,
            _energy_ratio(gated.samples, track.samples))


def features(track: Track, level: tuple[float, float],
             act: tuple[float, float, float]) -> SegmentFeatures:
    return SegmentFeatures(
        index=track.index, start_s=track.start_s, duration_s=track.duration_s,
        loudness_dbfs=level[0], peak_dbfs=level[1], speech_ratio=act[0],
        noise_floor_dbfs=act[1], gated_energy_ratio=act[2], samples_out=int(track.samples.size))


def demo_pipeline() -> Any:
    """The demo's stages as a ``stagepool.Pipeline`` (its value per segment: SegmentFeatures,
    equal to ``process_segment``'s)."""
    import stagepool as sp

    p = sp.Pipeline()
    p.stage("decode", decode)
    p.stage("resample", resample_track, after="decode")
    p.stage("levels", levels, after="resample")
    p.stage("gate", gate, after="resample")
    p.stage("activity", activity, after=("resample", "gate"))
    p.stage("features", features, after=("resample", "levels", "activity"))
    return p
