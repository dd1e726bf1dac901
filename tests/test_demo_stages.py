"""The demo workload's stages, on their own: synthesis, validation, DSP and feature ranges.

Nothing here starts a pool. The last tests drive ``run_demo`` through a serial stand-in for the
``stagepool`` API, so its exit code and report lines are checked without the engine.
"""

from __future__ import annotations

import ast
import itertools
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stagepool import _demo_stages, demo
from stagepool.demo import (
    CorruptSegmentError,
    Segment,
    noise_gate,
    process_segment,
    resample,
    soundtrack,
    synth_segment,
    validate,
    voice_activity,
)

RATE = 16_000


def tone(freq: float, seconds: float, rate: int, amplitude: float = 1.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)


def energy(x: np.ndarray) -> float:
    return float(np.sum(np.asarray(x, dtype=np.float64) ** 2))


def speech_like(seconds: float = 2.0, on: float = 0.2, off: float = 0.1) -> np.ndarray:
    """Harmonic bursts (150 Hz, 10 harmonics) ``on`` seconds long, ``off`` apart, faint noise."""
    t = np.arange(round(seconds * RATE)) / RATE
    harmonics = np.arange(1, 11)[:, None]
    voiced = (np.sin(2 * np.pi * 150 * harmonics * t) / harmonics).sum(axis=0)
    gate = (t % (on + off)) < on
    noise = np.random.default_rng(7).standard_normal(t.size) * 1e-3
    bursts: np.ndarray = 0.2 * voiced * gate + noise
    return bursts


# --- synthesis --------------------------------------------------------------------------------


def test_synth_segment_is_deterministic_per_seed_and_index() -> None:
    a, b = synth_segment(5, seed=3), synth_segment(5, seed=3)
    assert a.samples.shape == (96_000, 2) and a.samples.dtype == np.float32
    assert (a.index, a.start_s, a.sample_rate, a.duration_s) == (5, 10.0, 48_000, 2.0)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, synth_segment(6, seed=3).samples)
    assert not np.array_equal(a.samples, synth_segment(5, seed=4).samples)


def test_synth_segment_is_audio_not_silence() -> None:
    samples = synth_segment(0).samples
    assert np.isfinite(samples).all()
    assert 0.01 < float(np.abs(samples).max()) <= 1.0
    # Two channels that differ (independent noise, panned speech), not a copy.
    assert not np.array_equal(samples[:, 0], samples[:, 1])


def test_soundtrack_is_lazy() -> None:
    # A million-second track: only the segments asked for are ever made.
    first = list(itertools.islice(soundtrack(seconds=1e6), 2))
    assert [s.index for s in first] == [0, 1]


def test_soundtrack_yields_the_right_segments_and_time_ranges() -> None:
    segments = list(soundtrack(seconds=7.0, segment_seconds=2.0, corrupt=()))
    assert [s.index for s in segments] == [0, 1, 2, 3]
    assert [s.start_s for s in segments] == [0.0, 2.0, 4.0, 6.0]
    assert [s.duration_s for s in segments] == [2.0, 2.0, 2.0, 1.0]
    assert segments[-1].samples.shape == (48_000, 2)
    np.testing.assert_array_equal(segments[2].samples, synth_segment(2).samples)


def test_segment_count_and_default_corrupt_segments() -> None:
    assert demo.segment_count(600.0, 2.0) == 300
    assert demo.default_corrupt(300) == {100, 200}
    # Short tracks keep at least one valid segment.
    assert demo.default_corrupt(3) == {1, 2}
    assert demo.default_corrupt(2) == {1}
    assert demo.default_corrupt(1) == frozenset()
    with pytest.raises(ValueError, match="must be > 0"):
        soundtrack(seconds=0.0)


# --- validation -------------------------------------------------------------------------------


def test_exactly_the_corrupt_segments_fail_validation() -> None:
    segments = list(soundtrack(seconds=12.0))  # 6 segments: 2 and 4 are corrupt
    failures: dict[int, str] = {}
    for seg in segments:
        try:
            validate(seg)
        except CorruptSegmentError as exc:
            failures[seg.index] = str(exc)
    assert sorted(failures) == [2, 4]
    assert failures[2].startswith("segment 2 (4.0-6.0 s): ")
    assert "NaN samples" in failures[2] and "decoder" in failures[2]


def test_default_track_corrupt_segment_fails_in_process_segment() -> None:
    seg = synth_segment(100, corrupt=demo.default_corrupt(300))
    with pytest.raises(CorruptSegmentError, match=r"^segment 100 \(200\.0-202\.0 s\): \d+ NaN"):
        process_segment(seg)


@pytest.mark.parametrize(
    ("samples", "cause"),
    [
        (np.zeros(100, dtype=np.float32), r"shape \(100,\)"),
        (np.zeros((100, 3), dtype=np.float32), r"shape \(100, 3\)"),
        (np.zeros((0, 2), dtype=np.float32), r"shape \(0, 2\)"),
        (np.zeros((100, 2), dtype=np.float64), "float64, expected float32"),
        (np.full((100, 2), np.inf, dtype=np.float32), "200 infinite samples"),
    ],
)
def test_validate_rejects_bad_layouts(samples: np.ndarray, cause: str) -> None:
    seg = Segment(index=3, start_s=6.0, sample_rate=48_000, samples=samples)
    with pytest.raises(CorruptSegmentError, match=r"^segment 3 \(6\.0-.*" + cause):
        validate(seg)


def test_corrupt_segment_error_round_trips_through_pickle() -> None:
    try:
        process_segment(synth_segment(1, corrupt={1}))
    except CorruptSegmentError as exc:
        original = exc
    else:
        pytest.fail("corrupt segment passed validation")
    clone = pickle.loads(pickle.dumps(original))
    assert type(clone) is CorruptSegmentError
    assert str(clone) == str(original)
    assert (clone.index, clone.start_s, clone.end_s, clone.cause) == (
        original.index,
        original.start_s,
        original.end_s,
        original.cause,
    )


# --- DSP stages -------------------------------------------------------------------------------


def test_resample_keeps_a_1khz_sine() -> None:
    y = resample(tone(1000.0, 1.0, 48_000), 48_000, 16_000)
    assert y.size == 16_000
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert np.argmax(spectrum) * RATE / y.size == pytest.approx(1000.0)
    interior = y[500:-500]  # away from the segment edges, where the filter sees zeros
    assert np.sqrt(np.mean(interior**2)) == pytest.approx(np.sqrt(0.5), rel=1e-3)


def test_resample_attenuates_a_10khz_tone_by_more_than_40db() -> None:
    x = tone(10_000.0, 1.0, 48_000)
    y = resample(x, 48_000, 16_000)[500:-500]
    attenuation_db = 10 * np.log10(np.mean(x**2) / np.mean(y**2))
    assert attenuation_db > 40.0


def test_resample_polyphase_matches_direct_filtering() -> None:
    x = np.random.default_rng(0).standard_normal(9_001)
    taps = _demo_stages._lowpass_taps(3)
    half = (taps.size - 1) // 2
    direct = np.convolve(x, taps)[half::3][: -(-x.size // 3)]
    np.testing.assert_allclose(resample(x), direct, atol=1e-12)


def test_resample_rejects_non_integer_ratios() -> None:
    with pytest.raises(ValueError, match="integer decimation"):
        resample(np.zeros(10), 44_100, 16_000)


def test_to_mono_averages_channels() -> None:
    stereo = np.array([[1.0, 0.0], [0.5, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(demo.to_mono(stereo), [0.5, 0.0])


def test_noise_gate_strongly_reduces_pure_noise() -> None:
    noise = np.random.default_rng(1).standard_normal(2 * RATE) * 0.01  # -40 dBFS
    gated = noise_gate(noise, RATE)
    assert gated.samples.shape == noise.shape
    assert energy(gated.samples) / energy(noise) < 0.05  # more than 13 dB less
    assert gated.noise_floor_dbfs == pytest.approx(-40.0, abs=3.0)


def test_noise_gate_keeps_most_of_a_loud_tone() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(2 * RATE) * 0.003
    x[RATE // 2 : 3 * RATE // 2] += tone(1000.0, 1.0, RATE, amplitude=0.5)
    gated = noise_gate(x, RATE)
    assert energy(gated.samples) / energy(x) > 0.95
    assert gated.noise_floor_dbfs < -45.0  # from the quiet frames, not the tone


def test_noise_gate_with_every_bin_open_gives_the_input_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Analysis, window and overlap-add must be transparent; only the gains may change the signal.
    monkeypatch.setattr(_demo_stages, "_GATE_THRESHOLD_DB", -1000.0)
    x = np.random.default_rng(4).standard_normal(RATE + 123)
    np.testing.assert_allclose(noise_gate(x, RATE).samples, x, atol=1e-9)


def test_voice_activity_is_zero_on_silence_and_faint_noise() -> None:
    assert voice_activity(np.zeros(2 * RATE), RATE) == 0.0
    faint = np.random.default_rng(3).standard_normal(2 * RATE) * 1e-4
    assert voice_activity(faint, RATE) == 0.0
    assert voice_activity(np.zeros(10), RATE) == 0.0  # shorter than one frame


def test_voice_activity_is_high_on_speech_like_bursts() -> None:
    # 200 ms bursts, 100 ms pauses: 70 % of the time is voiced.
    assert voice_activity(speech_like(), RATE) == pytest.approx(0.7, abs=0.1)


def test_loudness_and_peak_levels() -> None:
    sine = tone(1000.0, 2.0, RATE)
    assert demo.loudness(sine, RATE) == pytest.approx(-3.01, abs=0.05)
    assert demo.peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert demo.loudness(np.zeros(RATE), RATE) == demo.SILENCE_DBFS
    # Gating: a loud second then a near-silent one read close to the loud second alone (-3 dB),
    # not to the plain average (-6 dB); the 400 ms blocks that straddle the change still count.
    half_quiet = np.concatenate([tone(1000.0, 1.0, RATE), tone(1000.0, 1.0, RATE, 1e-3)])
    assert -4.5 < demo.loudness(half_quiet, RATE) < -3.0


# --- the whole chain --------------------------------------------------------------------------


def test_process_segment_features_are_in_sane_ranges() -> None:
    features = [process_segment(synth_segment(i, seed=1)) for i in range(6)]
    for i, f in enumerate(features):
        assert (f.index, f.start_s, f.duration_s, f.samples_out) == (i, 2.0 * i, 2.0, 32_000)
        assert -60.0 < f.loudness_dbfs < 0.0
        assert f.loudness_dbfs < f.peak_dbfs <= 0.0
        assert 0.0 <= f.speech_ratio <= 1.0
        assert -80.0 < f.noise_floor_dbfs < f.peak_dbfs
        assert 0.0 <= f.gated_energy_ratio <= 1.0
    # The track has talkers: most segments have a fair share of voiced frames.
    assert np.mean([f.speech_ratio for f in features]) > 0.2


def test_work_crosses_process_boundaries() -> None:
    seg = synth_segment(4)
    clone = pickle.loads(pickle.dumps(seg))
    np.testing.assert_array_equal(clone.samples, seg.samples)
    assert pickle.loads(pickle.dumps(process_segment)) is process_segment  # by reference
    features = process_segment(seg)
    assert pickle.loads(pickle.dumps(features)) == features


@pytest.mark.parametrize("module", [_demo_stages, demo])
def test_demo_modules_import_only_numpy_and_the_standard_library(module: Any) -> None:
    # Workers import the stages to run process_segment; they must stay cheap to import.
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    top = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    third_party = {name.split(".")[0] for name in top} - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "_demo_synth", "_demo_stages"}  # the demo's own modules
