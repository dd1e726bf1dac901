"""The demo's media: its data types and the synthetic soundtrack it cuts into segments.

A 48 kHz stereo float32 track (a tone bed, speech-like bursts and background noise), each segment
generated on demand from ``(seed, index)`` so memory stays flat however long the track is. The
stages that process a segment are in ``_demo_stages``; ``stagepool.demo`` is the public face.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["ANALYSIS_RATE", "SILENCE_DBFS", "SOURCE_RATE", "CorruptSegmentError", "GateResult",
           "Mono32", "Segment", "SegmentFeatures", "Signal", "Stereo", "default_corrupt",
           "segment_count", "soundtrack", "synth_segment"]

Signal = npt.NDArray[np.float64]
Stereo = npt.NDArray[np.float32]
Mono32 = npt.NDArray[np.float32]

SOURCE_RATE: Final = 48_000
ANALYSIS_RATE: Final = 16_000
# Reported for silence instead of -inf, so features stay finite, comparable and JSON-friendly.
SILENCE_DBFS: Final = -120.0

# Synthesis levels (linear, full scale = 1.0). Speech sits ~25 dB over the tone bed and ~40 dB
# over the noise, so the gate and the VAD have something realistic to separate.
_NOISE_RMS: Final = 0.003
_TONE_AMPLITUDE: Final = 0.02
_SPEECH_PEAK: Final = (0.08, 0.3)
_TALKER_PROBABILITY: Final = 0.75  # share of segments with someone talking
_NAN_COUNT: Final = (800, 1600)
_TABLE_SIZE: Final = 4096  # wavetable oscillator length; a power of two, wrapped by a bit mask
# Distinguishes the per-segment random stream from any other stream seeded with the same numbers
# (SeedSequence ignores trailing zero words, so a bare [seed, index] would collide with [seed]).
_SEGMENT_STREAM: Final = 0x5E6

# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """A slice of the soundtrack: ``samples`` has shape ``(n, 2)``, float32, at ``sample_rate``.

    Equality is identity (``eq=False``): comparing arrays field by field is ambiguous in numpy.
    """

    index: int
    start_s: float
    sample_rate: int
    samples: Stereo

    @property
    def duration_s(self) -> float:
        """Length of the segment in seconds."""
        return int(self.samples.shape[0]) / self.sample_rate


@dataclass(frozen=True, slots=True)
class SegmentFeatures:
    """What ``process_segment`` measures on one segment (levels in dBFS, RMS-based: a full-scale
    sine reads -3 dBFS; silence reads ``SILENCE_DBFS``)."""

    index: int
    start_s: float
    duration_s: float
    loudness_dbfs: float  # gated RMS loudness of the 16 kHz mono mix
    peak_dbfs: float  # sample peak of the 16 kHz mono mix
    speech_ratio: float  # share of 20 ms frames the VAD marks active, 0..1
    noise_floor_dbfs: float  # broadband noise level estimated by the noise gate
    gated_energy_ratio: float  # energy after the noise gate / before, 0..1
    samples_out: int  # number of 16 kHz samples


@dataclass(frozen=True, slots=True, eq=False)
class GateResult:
    """Output of ``noise_gate``: the gated signal and the noise floor it estimated."""

    samples: Signal
    noise_floor_dbfs: float


class CorruptSegmentError(ValueError):
    """A segment that cannot be decoded into valid audio (NaN/Inf samples, wrong shape or dtype).

    The message names the segment, its time range and the cause. ``__reduce__`` rebuilds it from
    its fields, so it survives the trip from a worker process back to the parent intact.
    """

    def __init__(self, index: int, start_s: float, end_s: float, cause: str) -> None:
        super().__init__(f"segment {index} ({start_s:.1f}-{end_s:.1f} s): {cause}")
        self.index = index
        self.start_s = start_s
        self.end_s = end_s
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException would call cls(message) with one argument; rebuild from the fields instead.
        return (type(self), (self.index, self.start_s, self.end_s, self.cause), self.__dict__)


# --------------------------------------------------------------------------------------------------
# Synthesis


def synth_segment(
    index: int,
    *,
    seed: int = 0,
    segment_seconds: float = 2.0,
    sample_rate: int = SOURCE_RATE,
    corrupt: Collection[int] = frozenset(),
    duration_s: float | None = None,
) -> Segment:
    """Generate segment ``index`` of the soundtrack, deterministically from ``(seed, index)``.

    The segment starts at ``index * segment_seconds`` and lasts ``duration_s`` (default
    ``segment_seconds``; shorter for the last piece of a track). The tone bed is a function of
    absolute time, so it runs on across segments; speech and noise come from a random stream of
    this segment alone, so any segment can be made without the others. If ``index`` is in
    ``corrupt``, about a thousand samples are replaced by NaN.
    """
    _check_synth_args(index, seed, segment_seconds, sample_rate)
    length_s = segment_seconds if duration_s is None else duration_s
    n = max(1, round(length_s * sample_rate))
    start_s = index * segment_seconds
    rng = np.random.default_rng([_SEGMENT_STREAM, seed, index])
    bed = _tone_bed(start_s, n, sample_rate, seed)
    samples = _mix(bed, _speech_bursts(rng, n, sample_rate), rng)
    if index in corrupt:
        _sprinkle_nans(samples, rng)
    return Segment(index=index, start_s=start_s, sample_rate=sample_rate, samples=samples)


def soundtrack(
    *,
    seconds: float = 600.0,
    segment_seconds: float = 2.0,
    seed: int = 0,
    corrupt: Collection[int] | None = None,
) -> Iterator[Segment]:
    """Yield the segments of a ``seconds``-long soundtrack lazily, in order.

    The last segment is shorter when ``seconds`` is not a multiple of ``segment_seconds``.
    ``corrupt=None`` corrupts two segments at about 1/3 and 2/3 of the track (fewer on tracks of
    one or two segments, so at least one segment stays valid); pass ``()`` for a clean track.
    Validation happens here, before the first segment is made.
    """
    count = segment_count(seconds, segment_seconds)
    bad = frozenset(default_corrupt(count) if corrupt is None else corrupt)
    return _segments(count, seconds, segment_seconds, seed, bad)


def segment_count(seconds: float, segment_seconds: float) -> int:
    """Number of segments in a ``seconds``-long track (the last one may be partial)."""
    if not 0 < seconds < math.inf or not 0 < segment_seconds < math.inf:
        raise ValueError(
            f"seconds and segment_seconds must be > 0 and finite, got {seconds!r} and "
            f"{segment_seconds!r}"
        )
    # The tolerance keeps 600 / 2.0 at 300 segments despite float rounding.
    return max(1, math.ceil(seconds / segment_seconds - 1e-9))


def default_corrupt(count: int) -> frozenset[int]:
    """The segments corrupted by default: two, evenly spaced, always leaving one valid segment."""
    bad = min(2, count - 1)
    return frozenset((k + 1) * count // (bad + 1) for k in range(bad))


def _segments(
    count: int, seconds: float, segment_seconds: float, seed: int, bad: frozenset[int]
) -> Iterator[Segment]:
    for index in range(count):
        duration = min(segment_seconds, seconds - index * segment_seconds)
        yield synth_segment(
            index, seed=seed, segment_seconds=segment_seconds, corrupt=bad, duration_s=duration
        )


def _check_synth_args(index: int, seed: int, segment_seconds: float, sample_rate: int) -> None:
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index!r} and {seed!r}")
    if not segment_seconds > 0 or sample_rate <= 0:
        raise ValueError(
            f"segment_seconds and sample_rate must be > 0, got {segment_seconds!r}, {sample_rate!r}"
        )


def _tone_bed(start_s: float, n: int, rate: int, seed: int) -> Mono32:
    """Two sustained tones (2 and 3 times a root) with a slow swell, continuous across segments.

    Both are a function of absolute time, so the bed runs on seamlessly from segment to segment.
    """
    root = 110.0 * 2.0 ** ((seed % 12) / 12)
    tones = _lookup(_BED_TABLE, root * start_s + (root / rate) * np.arange(n, dtype=np.float64))
    return _swell(start_s, n, rate) * tones


def _swell(start_s: float, n: int, rate: int) -> Mono32:
    """Tone-bed level: a 37 s sine swell, sampled once a second and linearly interpolated."""
    t = start_s + np.arange(n, dtype=np.float64) / rate
    knots = np.arange(math.floor(start_s), math.ceil(t[-1]) + 1.0)
    levels = _TONE_AMPLITUDE * (1.0 + 0.5 * np.sin(2.0 * np.pi * knots / 37.0))
    return np.interp(t, knots, levels).astype(np.float32)


def _speech_bursts(rng: np.random.Generator, n: int, rate: int) -> Mono32:
    """Syllable-like harmonic bursts (120-350 ms) separated by pauses (50-400 ms), or silence."""
    out = np.zeros(n, dtype=np.float32)
    if rng.random() >= _TALKER_PROBABILITY:
        return out
    f0 = rng.uniform(95.0, 230.0)
    table = _voice_table(f0)
    pos = int(rng.uniform(0.0, 0.3) * rate)
    while pos < n:
        length = min(int(rng.uniform(0.12, 0.35) * rate), n - pos)
        out[pos : pos + length] = _syllable(rng, table, length, rate, f0)
        pos += length + int(rng.uniform(0.05, 0.4) * rate)
    return out


def _voice_table(f0: float) -> Mono32:
    """One period of a voiced sound at ``f0``: 10 harmonics, 1/k roll-off, two formant bumps."""
    k = np.arange(1, 11, dtype=np.float64)
    weights = _formant_weights(k * f0) / k
    return _harmonic_table(k, weights / weights.sum())


def _syllable(rng: np.random.Generator, table: Mono32, m: int, rate: int, f0: float) -> Mono32:
    """One voiced burst: the voice table played at a gliding pitch, half-sine envelope, 5 Hz AM."""
    u = np.arange(m, dtype=np.float32) / np.float32(max(m, 1))
    pitch = f0 * (1.0 + rng.uniform(-0.08, 0.08) * (u.astype(np.float64) - 0.5))
    voiced = _lookup(table, rng.random() + np.cumsum(pitch) / rate)
    tremolo = np.float32(1.0) + np.float32(0.3) * np.sin(np.float32(2 * np.pi * 5.0 * m / rate) * u)
    envelope: Mono32 = np.sin(np.float32(np.pi) * u) * tremolo
    envelope *= np.float32(rng.uniform(*_SPEECH_PEAK))
    return envelope * voiced


def _formant_weights(freqs: Signal) -> Signal:
    """Crude vowel colour: resonances near 500 Hz and 1.5 kHz over a weak flat floor."""
    return (
        np.exp(-(((freqs - 500.0) / 300.0) ** 2))
        + 0.6 * np.exp(-(((freqs - 1500.0) / 500.0) ** 2))
        + 0.1
    )


def _harmonic_table(harmonics: Signal, weights: Signal) -> Mono32:
    """One period (``_TABLE_SIZE`` points) of ``sum_i weights[i] * sin(harmonics[i] * phase)``."""
    phase = 2.0 * np.pi * np.arange(_TABLE_SIZE) / _TABLE_SIZE
    table: Mono32 = (weights @ np.sin(np.outer(harmonics, phase))).astype(np.float32)
    return table


def _lookup(table: Mono32, cycles: Signal) -> Mono32:
    """Wavetable oscillator: ``table`` at phase ``cycles`` (in periods, >= 0), nearest point.

    Far cheaper than ``np.sin`` per harmonic; with 4096 points the phase error stays under
    1e-3 of a period per harmonic, about -50 dB of distortion on the 10th harmonic.
    """
    index = (cycles * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1)
    out: Mono32 = table[index]
    return out


def _mix(bed: Mono32, speech: Mono32, rng: np.random.Generator) -> Stereo:
    """Pan speech slightly left, add independent white noise per channel: (n, 2) float32.

    The noise is uniform rather than Gaussian: spectrally the same, five times cheaper to draw.
    """
    stereo = rng.random((bed.size, 2), dtype=np.float32)
    stereo -= np.float32(0.5)
    stereo *= np.float32(_NOISE_RMS * math.sqrt(12.0))  # uniform on [-a/2, a/2] has RMS a/sqrt(12)
    stereo[:, 0] += bed + np.float32(0.9) * speech
    stereo[:, 1] += bed + np.float32(0.7) * speech
    return stereo


_BED_TABLE: Final = _harmonic_table(np.array([2.0, 3.0]), np.array([1.0, 0.5]))


def _sprinkle_nans(samples: Stereo, rng: np.random.Generator) -> None:
    """Replace a random ~0.5-1 % of the samples by NaN, in place (a decoder gone wrong)."""
    flat = samples.reshape(-1)
    count = min(flat.size, int(rng.integers(*_NAN_COUNT)))
    flat[rng.choice(flat.size, size=count, replace=False)] = np.nan
