"""The media-real workload: a real PyAV / soundfile / scipy job, as a media team would write it.

Needs the ``[media]`` extra (``pip install "stagepool[media]"``: av, soundfile, scipy); without it
every row is "n/a" with that line, and nothing else changes. Each row's process makes its own
material before its pool starts (identical for every peer, seeded): a synthetic 48 kHz stereo
soundtrack and a 96x64 H.264 video, cut into uneven segments (0.6 to 3.1 s), each carried as a
FLAC blob and an MP4 blob, two of them damaged (garbled FLAC, truncated MP4).

The stage, per segment: decode the FLAC (soundfile) and the video (PyAV, with
``stagepool.worker_threads()`` decoder threads), stereo -> mono, resample 48 -> 16 kHz
(``scipy.signal.resample_poly``), 40-band log-mel (numpy FFT + a filterbank matmul), silence
share, scene-change score and a thumbnail from the frames, and encode the 16 kHz audio to FLAC.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import itertools
from typing import Any

import numpy as np

from .base import RssSampler, Target, Workload, check
from .peers import Peer, PeerSpec

__all__ = ["MediaReal", "Segment", "make_segments", "missing_media", "process_segment"]

MEDIA_MODULES = ("av", "soundfile", "scipy")
RATE, LOW_RATE, FPS = 48_000, 16_000, 12
DURATIONS = (0.6, 1.7, 3.1, 1.1, 2.4, 0.9, 2.0)  # uneven, cycled
MEL_BANDS, N_FFT, HOP = 40, 512, 160


def missing_media() -> str | None:
    """The install line when a module of the [media] extra is missing, else None."""
    for name in MEDIA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return f"needs the [media] extra: pip install \"stagepool[media]\" (no module {name!r})"
    return None


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int
    seconds: float
    audio: bytes  # FLAC, 48 kHz stereo
    video: bytes  # MP4 (H.264), FPS frames per second


def _soundtrack(n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.25 * t) > -0.3)  # gaps
    left = tone + 0.02 * rng.standard_normal(n)
    right = 0.5 * tone + 0.02 * rng.standard_normal(n)
    return np.stack([left, right], axis=1).astype(np.float32)


def _video(seconds: float, index: int) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        ramp = np.linspace(0, 255, 96, dtype=np.float32)[None, :]
        for k in range(max(1, round(seconds * FPS))):
            shade = (ramp + 7 * k + (80 if k > FPS else 0) + 13 * index) % 256  # a cut after 1 s
            rgb = np.repeat(np.broadcast_to(shade, (64, 96))[..., None], 3, axis=2).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return out.getvalue()


def make_segments(seconds: float, damaged: tuple[int, ...], seed: int = 7) -> list[Segment]:
    """About ``seconds`` of material in uneven segments; those in ``damaged`` are corrupt."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    segments: list[Segment] = []
    total = 0.0
    while total < seconds:
        i = len(segments)
        length = DURATIONS[i % len(DURATIONS)]
        buf = io.BytesIO()
        sf.write(buf, _soundtrack(int(length * RATE), rng), RATE, format="FLAC")
        audio, video = buf.getvalue(), _video(length, i)
        if i in damaged:  # a garbled audio frame area and a cut-off video
            audio = audio[:64] + bytes(rng.integers(0, 256, len(audio) - 64, dtype=np.uint8))
            video = video[: len(video) // 3]
        segments.append(Segment(i, length, audio, video))
        total += length
    return segments


_MEL: np.ndarray | None = None


def _mel_bank() -> np.ndarray:
    global _MEL
    if _MEL is None:
        edges = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), MEL_BANDS + 2) / 2595) - 1)
        bins = np.fft.rfftfreq(N_FFT, 1 / LOW_RATE)
        bank = np.zeros((MEL_BANDS, bins.size), dtype=np.float32)
        for b in range(MEL_BANDS):
            lo, mid, hi = edges[b : b + 3]
            bank[b] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
        _MEL = bank
    return _MEL


def _audio_features(audio: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    import soundfile as sf
    from scipy.signal import resample_poly

    low = resample_poly(audio.mean(axis=1), LOW_RATE, RATE).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(low, N_FFT)[::HOP] * np.hanning(N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = np.log10(power @ _mel_bank().T + 1e-10)
    silent = float(np.mean(10 * np.log10(power.mean(axis=1) + 1e-12) < -50))
    out = io.BytesIO()
    sf.write(out, low, LOW_RATE, format="FLAC")
    return mel.mean(axis=0), silent, low.size / LOW_RATE, len(out.getvalue())


def _video_features(blob: bytes) -> tuple[int, float, float]:
    import av

    import stagepool as sp

    with av.open(io.BytesIO(blob)) as box:
        stream = box.streams.video[0]
        stream.thread_count = sp.worker_threads()  # FFmpeg would take every core in every worker
        grays = [frame.to_ndarray(format="gray").astype(np.float32) for frame in box.decode(stream)]
    if not grays:
        raise ValueError("no video frames decoded")
    cuts = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(grays)]
    thumb = grays[len(grays) // 2][::8, ::8]
    return len(grays), max(cuts, default=0.0), float(thumb.mean())


def process_segment(segment: Segment) -> tuple[int, float, float, float, int, int, float]:
    """decode -> resample -> features -> encode; raises on a damaged segment (as PyAV and
    libsndfile do: ``soundfile.LibsndfileError``, ``av.error.InvalidDataError``, ...)."""
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(segment.audio), dtype="float32", always_2d=True)
    check(rate == RATE, f"segment {segment.index}: {rate} Hz")
    mel, silent, seconds, flac_bytes = _audio_features(audio)
    frames, scene, _thumb = _video_features(segment.video)
    return segment.index, seconds, float(mel.mean()), silent, flac_bytes, frames, scene


class MediaReal(Workload):
    """What does a real PyAV / soundfile / scipy segment job get from each pool? Segments/s,
    realtime factor, items lost to bad segments, parent peak RSS (needs the [media] extra).

    decode (FLAC + H.264) -> resample 48 -> 16 kHz -> log-mel, silence, scene score ->
    FLAC encode, on uneven segments of which two are damaged. ProcessPoolExecutor runs as
    written in a hurry (``list(ex.map(...))``: the first bad segment ends the batch), then with a
    future per segment (every good one completes: the speed to compare), with and without its
    BLAS and decoder threads capped (spawned workers, thread variables set); joblib raises on the
    first error.
    """

    name = "media-real"

    def params(self, quick: bool) -> dict[str, Any]:
        seconds = 20.0 if quick else 60.0
        return {"missing": missing_media(), "seconds": seconds,
                "damaged": [3, 11] if not quick else [3]}

    def facts(self, params: dict[str, Any]) -> str:
        if params.get("missing"):
            return str(params["missing"])
        return (f"~{params['seconds']:g} s of 48 kHz stereo FLAC + 96x64 H.264 at {FPS} fps, "
                f"segments of {min(DURATIONS)}-{max(DURATIONS)} s, damaged: {params['damaged']}; "
                f"{params['workers']} workers")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        threads = max(1, _usable_cpus() // max(1, int(params.get("workers", 2))))
        rows = [
            PeerSpec("serial", "serial", "serial loop (1 run: the reference)"),
            PeerSpec("ppe-map", "ppe", "ProcessPoolExecutor: list(ex.map(...)) as written"),
            PeerSpec("ppe", "ppe", "ProcessPoolExecutor: submit per segment, default threads",
                     {"how": "submit"}),
            PeerSpec("ppe-capped", "ppe", f"ProcessPoolExecutor (spawn): submit per segment, "
                     f"{threads} BLAS + decoder thread(s) per worker",
                     {"how": "submit", "blas_threads": threads}),
            PeerSpec("joblib", "joblib", 'joblib Parallel batch_size="auto"'),
            PeerSpec("stagepool", "stagepool", 'stagepool Engine.map chunk_size="auto"'),
        ]
        missing = params.get("missing")
        return [dataclasses.replace(row, na=missing) for row in rows] if missing else rows

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        return (0, 1) if spec.peer == "serial" else (1, repeat)

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        segments = make_segments(params["seconds"], tuple(params["damaged"]))
        return segments, frozenset(params["damaged"])

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        import time

        segments, damaged = state
        sampler = RssSampler(interval=0.05)
        began = time.perf_counter()
        got = peer.collect(process_segment, segments)
        seconds = time.perf_counter() - began
        rss = sampler.stop()
        good = [s for s in segments if s.index not in damaged]
        done = [s for s in good if s.index in got.values]
        check(all(got.values[s.index][0] == s.index for s in done), "results in input order")
        return {"seconds": seconds, "ok": len(done), "lost": len(good) - len(done),
                "audio_s": sum(s.seconds for s in done), "rss_mb": rss / 1e6,
                "damaged": len(damaged)}

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        extra["lost"] = max(r["lost"] for r in runs)  # every run must keep the good segments
        extra["rss_mb"] = max(r["rss_mb"] for r in [*warmup, *runs])
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        rate = e["ok"] / row["median_s"]
        return rate, (f"{rate:,.1f} segments/s, {e['audio_s'] / row['median_s']:,.0f}x realtime, "
                      f"{e['lost']:.0f} good lost to {e['damaged']:.0f} bad, parent peak RSS "
                      f"+{e['rss_mb']:,.0f} MB")

    def ratio_seconds(self, row: dict[str, Any]) -> float | None:
        return None if row["extra"].get("lost") else row["median_s"]  # fast at losing: no ratio

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        e = row["extra"]
        return (e["ok"] if e["lost"] == 0 else 0.0), "segments"

    def judged(self, row: dict[str, Any]) -> bool:
        return row["peer"] == "stagepool" and row["status"] != "n/a"  # no extra: no verdict

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def kept(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            return row["extra"]["lost"] == 0, f"{row['extra']['lost']:.0f} lost"

        return [Target("no good segment lost to a bad one", kept)]


def _usable_cpus() -> int:
    import stagepool as sp

    return sp.worker_threads()  # outside a worker: the usable CPUs
