"""The demo's stages: pure numpy, silent, one segment at a time (see ``stagepool.demo``).

``process_segment`` runs the chain; it is what the engine ships to worker processes, so it is a
module-level function, and this module imports nothing but numpy and the demo's data types.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._demo_synth import (
    ANALYSIS_RATE,
    SILENCE_DBFS,
    SOURCE_RATE,
    CorruptSegmentError,
    GateResult,
    Segment,
    SegmentFeatures,
    Signal,
    Stereo,
)

__all__ = ["loudness", "noise_gate", "peak_dbfs", "process_segment", "resample", "to_mono",
           "validate", "voice_activity"]

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
