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

``process_segment`` runs that chain; it is what the engine ships to worker processes, so it is a
module-level function and this module imports nothing but numpy at import time. ``run_demo`` is
the only function that prints and the only one that touches the ``stagepool`` API (lazily).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

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

# CPU budget: one 2 s segment costs ~20 ms of CPU on one core of a 2-core CI box (measure with
# `python -m timeit`), so pickling and shipping its 750 kB stays a few per cent of the work. The
# resampler and the gate overlap below are the knobs; each says what it buys.

# Resampler: flat to 97 % of the new Nyquist frequency, 150 dB down from it on (the dynamic range of
# float32 input, so nothing aliases audibly; libsamplerate's best converter is in this class).
# Kaiser's formulas make that a ~2000-tap filter at 48 -> 16 kHz, ~660 multiply-adds per output
# sample: about 40 % of the segment's CPU. 95 % passband halves the cost but dulls 7.6-8 kHz.
_RESAMPLE_PASSBAND: Final = 0.97
_RESAMPLE_STOPBAND_DB: Final = 150.0

# Noise gate: 64 ms Hann frames (16 Hz bins resolve voice harmonics) every 4 ms (93.75 % overlap:
# the gain moves in 4 ms steps, so speech onsets are not clipped; 8 ms steps halve the gate's
# cost, ~25 % of the total, at the price of audible stepping). The floor is the RMS of the
# quietest 10 % of frames; bins less than 8 dB over it drop by 30 dB, and the on/off mask is
# averaged over 3 frames x 3 bins so isolated noise peaks do not "twinkle".
_GATE_FRAME_S: Final = 0.064
_GATE_OVERLAP: Final = 16
_GATE_QUIET_SHARE: Final = 0.10
_GATE_THRESHOLD_DB: Final = 8.0
_GATE_REDUCTION_DB: Final = 30.0

# Loudness: BS.1770-style gating (400 ms blocks every 100 ms, absolute gate -70 dBFS, relative gate
# 10 dB under the absolute-gated level), without the K-weighting filter.
_LOUDNESS_BLOCK_S: Final = 0.4
_LOUDNESS_HOP_S: Final = 0.1
_ABSOLUTE_GATE_DBFS: Final = -70.0
_RELATIVE_GATE_DB: Final = 10.0

# VAD: 20 ms frames; active when 9 dB over the quiet-frame level (10th percentile) and over an
# absolute -60 dBFS, so digital silence and faint noise never count as speech.
_VAD_FRAME_S: Final = 0.020
_VAD_FLOOR_PERCENTILE: Final = 10.0
_VAD_MARGIN_DB: Final = 9.0
_VAD_ABSOLUTE_DBFS: Final = -60.0


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
    if not seconds > 0 or not segment_seconds > 0:
        raise ValueError(
            f"seconds and segment_seconds must be > 0, got {seconds!r} and {segment_seconds!r}"
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


# --------------------------------------------------------------------------------------------------
# Stages (pure, silent)


def validate(seg: Segment) -> Stereo:
    """Return ``seg.samples`` if they are finite (n, 2) float32 audio, else raise
    ``CorruptSegmentError`` naming the segment, its time range and what is wrong."""
    samples = seg.samples
    cause = _corruption(samples)
    if cause is not None:
        raise CorruptSegmentError(seg.index, seg.start_s, seg.start_s + _seconds(seg), cause)
    return samples


def _seconds(seg: Segment) -> float:
    # duration_s assumes the (n, 2) layout that validation is about to reject; len() does not.
    return len(seg.samples) / seg.sample_rate if seg.sample_rate > 0 else 0.0


def _corruption(samples: npt.NDArray[Any]) -> str | None:
    """Describe what is wrong with ``samples``, or None when it is valid audio."""
    if samples.ndim != 2 or samples.shape[1] != 2 or samples.shape[0] == 0:
        return f"samples have shape {samples.shape}, expected (n, 2) stereo with n > 0"
    if samples.dtype != np.float32:
        return f"samples are {samples.dtype}, expected float32"
    nans = int(np.count_nonzero(np.isnan(samples)))
    infs = int(np.count_nonzero(np.isinf(samples)))
    if nans or infs:
        counts = ((nans, "NaN"), (infs, "infinite"))
        found = ", ".join(f"{count} {what} samples" for count, what in counts if count)
        return f"{found}; the decoder produced garbage"
    return None


def to_mono(x: npt.NDArray[np.floating[Any]]) -> Signal:
    """Average the channels of ``(n, channels)`` audio into ``(n,)`` float64; 1-D passes through."""
    if x.ndim == 1:
        return x.astype(np.float64)
    # Summing columns beats np.mean(axis=1) on (n, 2) float32 by ~8x and keeps BLAS out of it.
    mono = x[:, 0].astype(np.float64)
    for channel in range(1, x.shape[1]):
        mono += x[:, channel]
    mono /= x.shape[1]
    return mono


def resample(x: Signal, src_rate: int = SOURCE_RATE, dst_rate: int = ANALYSIS_RATE) -> Signal:
    """Resample ``x`` by an integer factor: windowed-sinc FIR low-pass, then keep every M-th sample.

    The filter is applied in polyphase form (only the kept outputs are computed) and is linear-phase
    with its delay removed, so the output is aligned with the input: ``y[m]`` is at ``x[m * M]``.
    The output has ``ceil(len(x) / M)`` samples. Raises ``ValueError`` unless ``src_rate`` is a
    multiple of ``dst_rate``.
    """
    if dst_rate <= 0 or src_rate % dst_rate:
        raise ValueError(
            f"resample supports integer decimation only: {src_rate} Hz is not a multiple of "
            f"{dst_rate} Hz"
        )
    factor = src_rate // dst_rate
    if factor == 1:
        return np.array(x, dtype=np.float64)
    taps = _lowpass_taps(factor)
    return _polyphase_decimate(np.asarray(x, dtype=np.float64), taps, factor)


@functools.lru_cache(maxsize=8)
def _lowpass_taps(factor: int) -> Signal:
    """Kaiser-windowed sinc low-pass for decimation by ``factor``, with unit gain at DC.

    The transition band runs from 97 % of the new Nyquist frequency to the new Nyquist frequency;
    length and beta follow Kaiser's formulas for the stopband attenuation. The half-length is a
    multiple of ``factor``, which the polyphase split relies on.
    """
    nyquist = 0.5 / factor  # new Nyquist frequency, in cycles per input sample
    transition = (1.0 - _RESAMPLE_PASSBAND) * nyquist
    length = (_RESAMPLE_STOPBAND_DB - 8.0) / (2.285 * 2.0 * np.pi * transition)
    half = math.ceil(length / 2.0 / factor) * factor
    beta = 0.1102 * (_RESAMPLE_STOPBAND_DB - 8.7)
    taps = _windowed_sinc(nyquist - transition / 2.0, half, beta)
    taps /= taps.sum()
    taps.flags.writeable = False  # shared through the cache
    return taps


def _windowed_sinc(cutoff: float, half: int, beta: float) -> Signal:
    """Kaiser-windowed ideal low-pass, ``2 * half + 1`` taps, cutoff in cycles per sample."""
    n = np.arange(-half, half + 1, dtype=np.float64)
    taps: Signal = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * np.kaiser(n.size, beta)
    return taps


def _polyphase_decimate(x: Signal, taps: Signal, factor: int) -> Signal:
    """``y[m] = sum_k taps[k] * x[m*M + half - k]``: the centred filter, evaluated only where kept.

    Splitting k = q*M + r turns it into M "valid" convolutions at the low rate, one per phase r:
    the taps ``taps[r::M]`` against every M-th input sample from offset ``M - r`` of the padded
    input (a strided view, no copy). Needs ``2 * half`` to be a multiple of M.
    """
    half = (taps.size - 1) // 2
    per_phase = -(-taps.size // factor)
    out_len = -(-x.size // factor)
    span = out_len + per_phase - 1  # low-rate input samples each phase needs
    # One extra block at the front turns x[j*M - r] (negative for j = 0) into a plain slice.
    buf = np.zeros((span + 1) * factor)
    buf[half + factor : half + factor + x.size] = x
    padded_taps = np.zeros(per_phase * factor)
    padded_taps[: taps.size] = taps
    y = np.zeros(out_len)
    for r in range(factor):
        phase = buf[factor - r :: factor][:span]
        y += np.convolve(phase, padded_taps[r::factor], mode="valid")
    return y


def noise_gate(x: Signal, rate: int = ANALYSIS_RATE) -> GateResult:
    """Spectral noise gate: attenuate STFT bins that do not rise clearly over the noise floor.

    Hann-windowed frames (64 ms every 4 ms, reflect-padded at the ends) go through
    ``np.fft.rfft``. The noise floor of each frequency bin is the RMS magnitude over the quietest
    10 % of frames; bins less than 8 dB over their floor are cut by 30 dB (the on/off decision is
    smoothed over 3 frames x 3 bins), and the frames are overlap-added back (a periodic Hann window
    at this overlap sums to a constant, so untouched bins come back unchanged). ``noise_floor_dbfs``
    is the level of that floor as a time signal. A tone that never stops looks exactly like hum:
    it sets its own floor and is gated too.
    """
    frame = _gate_frame(rate)
    if x.size < frame:
        return GateResult(np.array(x, dtype=np.float64), _level_dbfs(float(np.mean(x**2))))
    hop = frame // _GATE_OVERLAP
    padded = np.pad(x, (frame - hop, _tail_pad(x.size, frame, hop)), mode="reflect")
    window = np.hanning(frame + 1)[:-1]  # periodic Hann: constant overlap-add sum
    spectra = np.fft.rfft(_frames(padded, frame, hop) * window, axis=1)
    floor = _noise_floor(spectra)
    spectra *= _gate_gains(np.abs(spectra), floor)
    gated = _overlap_add(np.fft.irfft(spectra, n=frame, axis=1), hop) / (window.sum() / hop)
    noise_dbfs = _level_dbfs(_spectrum_power(floor, window))
    return GateResult(gated[frame - hop : frame - hop + x.size], noise_dbfs)


def _gate_frame(rate: int) -> int:
    """Frame length in samples, rounded to a multiple of the overlap factor."""
    frame = round(_GATE_FRAME_S * rate)
    return max(_GATE_OVERLAP, frame - frame % _GATE_OVERLAP)


def _tail_pad(n: int, frame: int, hop: int) -> int:
    """End padding that makes the last frame land exactly on the end and covers the whole signal."""
    covered = n + frame - hop  # signal plus the front pad
    return frame - hop + (-(covered - hop) % hop)


def _frames(x: Signal, frame: int, hop: int) -> Signal:
    """Strided (no-copy) view of the overlapping frames of ``x``, one per row."""
    return np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]


def _noise_floor(spectra: npt.NDArray[np.complex128]) -> Signal:
    """Per-bin RMS magnitude over the quietest frames (by total energy)."""
    power = np.abs(spectra) ** 2
    energy = power.sum(axis=1)
    quiet = max(1, int(_GATE_QUIET_SHARE * energy.size))
    quietest = np.argpartition(energy, quiet - 1)[:quiet]
    floor: Signal = np.sqrt(power[quietest].mean(axis=0))
    return floor


def _gate_gains(magnitude: Signal, floor: Signal) -> Signal:
    """Gain per bin: 1 where the 3x3 neighbourhood clears the threshold, the reduction where none
    of it does, in between at the edges of a region (so isolated noise peaks stay mostly cut)."""
    threshold = floor * math.pow(10.0, _GATE_THRESHOLD_DB / 20.0)
    opened = _box3x3((magnitude > threshold).astype(np.float64))
    reduction = math.pow(10.0, -_GATE_REDUCTION_DB / 20.0)
    gains: Signal = reduction + (1.0 - reduction) * opened
    return gains


def _box3x3(a: Signal) -> Signal:
    """Mean over each element's 3x3 neighbourhood (edges repeated)."""
    padded = np.pad(a, 1, mode="edge")
    rows, cols = a.shape
    total = np.zeros_like(a)
    for di in range(3):
        for dj in range(3):
            total += padded[di : di + rows, dj : dj + cols]
    return total / 9.0


def _overlap_add(frames: Signal, hop: int) -> Signal:
    """Sum rows of ``frames`` placed ``hop`` samples apart (hop divides the frame length)."""
    count, frame = frames.shape
    out = np.zeros((count - 1) * hop + frame)
    for j in range(frame // hop):
        # Sub-block j of every frame lands on a regular grid: one vectorised add per sub-block.
        out[j * hop : j * hop + count * hop] += frames[:, j * hop : (j + 1) * hop].reshape(-1)
    return out


def _spectrum_power(magnitude: Signal, window: Signal) -> float:
    """Mean-square time-domain level behind a one-sided windowed magnitude spectrum (Parseval)."""
    full = 2.0 * np.sum(magnitude**2) - magnitude[0] ** 2 - magnitude[-1] ** 2
    return float(full / (window.size * np.sum(window**2)))


def loudness(x: Signal, rate: int = ANALYSIS_RATE) -> float:
    """Gated RMS loudness in dBFS (BS.1770-style gating of 400 ms blocks, no K-weighting).

    Blocks quieter than -70 dBFS, then blocks more than 10 dB under the level of those remaining,
    are ignored; a signal shorter than one block is one block. Silence gives ``SILENCE_DBFS``.
    """
    blocks = _block_power(x, round(_LOUDNESS_BLOCK_S * rate), round(_LOUDNESS_HOP_S * rate))
    audible = blocks[blocks > _power(_ABSOLUTE_GATE_DBFS)]
    if audible.size == 0:
        return SILENCE_DBFS
    relative = _power(_level_dbfs(float(audible.mean())) - _RELATIVE_GATE_DB)
    return _level_dbfs(float(audible[audible > relative].mean()))


def _block_power(x: Signal, block: int, hop: int) -> Signal:
    """Mean square of each ``block``-long window, every ``hop`` samples (cumulative sums)."""
    if x.size <= block:
        return np.array([np.mean(x**2)]) if x.size else np.zeros(1)
    sums = np.concatenate([[0.0], np.cumsum(x**2)])
    starts = np.arange(0, x.size - block + 1, hop)
    power: Signal = (sums[starts + block] - sums[starts]) / block
    return power


def peak_dbfs(x: Signal) -> float:
    """Sample peak in dBFS (a full-scale sample reads 0 dBFS; silence ``SILENCE_DBFS``)."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return _level_dbfs(peak**2)


def voice_activity(x: Signal, rate: int = ANALYSIS_RATE) -> float:
    """Share of 20 ms frames whose energy is 9 dB over the quiet-frame level.

    The threshold adapts to the background (the 10th percentile of frame levels) but never drops
    under -60 dBFS, so silence and faint noise score 0. It assumes pauses: speech without a single
    pause raises its own threshold. A trailing partial frame is ignored; fewer than one frame
    scores 0.
    """
    frame = round(_VAD_FRAME_S * rate)
    count = x.size // frame
    if count == 0:
        return 0.0
    power = np.mean(x[: count * frame].reshape(count, frame) ** 2, axis=1)
    levels = 10.0 * np.log10(power + _power(SILENCE_DBFS))
    floor = float(np.percentile(levels, _VAD_FLOOR_PERCENTILE))
    threshold = max(floor + _VAD_MARGIN_DB, _VAD_ABSOLUTE_DBFS)
    return float(np.count_nonzero(levels > threshold)) / count


def _power(dbfs: float) -> float:
    """Mean-square power of a level in dBFS."""
    return math.pow(10.0, dbfs / 10.0)


def _level_dbfs(power: float) -> float:
    """Level in dBFS of a mean-square power, floored at ``SILENCE_DBFS``."""
    return max(SILENCE_DBFS, 10.0 * math.log10(power)) if power > 0 else SILENCE_DBFS


def process_segment(seg: Segment) -> SegmentFeatures:
    """Run the whole chain on one segment (what the engine runs in worker processes).

    validate -> to_mono -> resample to 16 kHz -> noise_gate -> loudness, peak, voice activity.
    Loudness and peak describe the 16 kHz mix before the gate; voice activity is measured after
    it. Raises ``CorruptSegmentError`` for invalid audio; prints nothing.
    """
    mix = resample(to_mono(validate(seg)), seg.sample_rate, ANALYSIS_RATE)
    gated = noise_gate(mix, ANALYSIS_RATE)
    return SegmentFeatures(
        index=seg.index,
        start_s=seg.start_s,
        duration_s=seg.duration_s,
        loudness_dbfs=loudness(mix, ANALYSIS_RATE),
        peak_dbfs=peak_dbfs(mix),
        speech_ratio=voice_activity(gated.samples, ANALYSIS_RATE),
        noise_floor_dbfs=gated.noise_floor_dbfs,
        gated_energy_ratio=_energy_ratio(gated.samples, mix),
        samples_out=int(mix.size),
    )


def _energy_ratio(after: Signal, before: Signal) -> float:
    """Energy kept by the gate; 1.0 for an all-zero input (nothing there to remove)."""
    total = float(np.sum(before**2))
    return min(1.0, float(np.sum(after**2)) / total) if total > 0 else 1.0


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
) -> int:
    """Process a synthetic soundtrack on a stagepool ``Engine`` and print what happened.

    Plans the workers for 64 MiB per segment (``workers="auto"``) or uses ``workers``, maps
    ``process_segment`` over ``soundtrack(seconds=..., segment_seconds=...)``, then prints the
    plan's reason, the report summary, one line per failed segment, throughput, the realtime
    factor and the speedup over running ``process_segment`` serially here (timed on ``sample``
    valid segments after the pool has shut down and extrapolated; ``sample=0`` skips it).

    Returns 0 when exactly the deliberately corrupt segments failed, with ``CorruptSegmentError``,
    and 1 otherwise. Raises ``ValueError`` for non-positive durations or a negative ``sample``.

    Cancellation and shutdown: a ``KeyboardInterrupt`` during the batch propagates out of
    ``engine.map``; leaving the ``with`` block shuts the engine and its workers down before it
    reaches the caller, and nothing more is printed. The serial measurement runs in this process.
    """
    import stagepool as sp

    count = segment_count(seconds, segment_seconds)
    if sample < 0:
        raise ValueError(f"sample must be >= 0 segments, got {sample!r}")
    corrupt = default_corrupt(count)
    plan = sp.plan_workers(mem_per_task=_MEM_PER_TASK)
    out(f"plan: {plan.reason}")
    out(_workload_line(count, seconds, segment_seconds, corrupt))
    chosen = plan.workers if workers == "auto" else workers
    with sp.Engine(workers=chosen, mem_per_task=_MEM_PER_TASK) as engine:
        # Warm-up: start every worker and import this module there, so the measured batch is
        # the steady state a long-running service sees, not interpreter start-up.
        warm = synth_segment(0, segment_seconds=segment_seconds)
        engine.map(process_segment, [warm] * (2 * engine.workers), chunk_size=1)
        report: _Report = engine.map(
            process_segment,
            soundtrack(seconds=seconds, segment_seconds=segment_seconds),
            progress=progress,
            desc="segments",
        )
    _print_report(report, seconds, out)
    if sample:
        serial = _serial_seconds_per_segment(sample, count, segment_seconds, corrupt)
        out(_speedup_line(serial, sample, len(report), report.stats.wall_time))
    return 0 if _only_expected_failures(report.failed, corrupt) else 1


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
