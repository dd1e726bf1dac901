"""The 4-stage pipeline workload of ``benchmarks.pipeline`` (importable by every peer's
workers: module-level functions of plain arguments).

A segment is made from its index (65,536 float32 samples, 256 KiB). The stages are uneven on
purpose: decode ~1x, analyse ~5x, features ~2x, encode ~1x; each intermediate is 256 KiB, the
result a few bytes, as in a media job whose value is its measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_SAMPLES = 65_536


def source(index: int) -> int:
    return index


def decode(index: int) -> Any:
    rng = np.random.default_rng(index)
    x = rng.standard_normal(N_SAMPLES, dtype=np.float32)
    return np.cumsum(x, dtype=np.float32) * np.float32(1e-3)


def analyse(x: Any) -> Any:
    y = x
    for _ in range(2):
        spectrum = np.fft.rfft(y)
        spectrum[len(spectrum) // 4:] *= 0.5
        y = np.fft.irfft(spectrum, n=len(x)).astype(np.float32)
    return y


def features(x: Any) -> Any:
    kernel = np.hanning(33).astype(np.float32)
    return np.abs(np.convolve(x, kernel, mode="same")).astype(np.float32)


def encode(x: Any) -> tuple[float, float, float]:
    return float(x.mean()), float(x.std()), float(np.percentile(x[::16], 95))


STAGES = (decode, analyse, features, encode)


def fused(index: int) -> tuple[float, float, float]:
    """All four stages in one function: the ceiling a pipeline's fusion aims for."""
    return encode(features(analyse(decode(index))))


# ---- uneven segments (``benchmarks.pipeline_cost``): an item is (index, units of analysis) -----


def decode_sized(item: tuple[int, int]) -> tuple[Any, int]:
    index, units = item
    return decode(index), units


def analyse_sized(sized: tuple[Any, int]) -> tuple[float, float, float]:
    """``units`` rounds of ``analyse``: a segment's cost is proportional to its units."""
    x, units = sized
    for _ in range(units):
        x = analyse(x)
    return encode(x)
