"""The data workloads: big numpy arrays in and out (``big-arrays``) and the demo's real media stage
(``media``). Both pre-build their inputs in the row's process before any timing, deterministically,
so every peer gets the same data.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterator
from typing import Any

from . import workloads
from .base import MB, MIB, RssSampler, Target, Workload, check, map_specs, timed_map
from .peers import Peer, PeerSpec

__all__ = ["BigArrays", "BigStream", "Media", "memcpy_bandwidth"]


# ---- big-arrays ---------------------------------------------------------------------------------

def memcpy_bandwidth(nbytes: int, arrays: int = 32, repeats: int = 3) -> dict[str, float]:
    """The physical limit of moving arrays: bytes per second of ``np.copyto`` of ``arrays``
    distinct ``nbytes`` float32 arrays one after the other (256 MiB for 32 x 8 MiB: more than any
    cache, as a batch's arrays are), the best of ``repeats`` (other load only slows a copy down)."""
    import numpy as np

    src = np.ones((arrays, nbytes // 4), dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for k in range(arrays):
            np.copyto(dst[k], src[k])
        best = min(best, time.perf_counter() - began)
    return {"memcpy_mb_s": arrays * nbytes / best / MB}


class _Counted:
    """A list seen through a counter: a pool reading it is counted as it takes each item, so the
    run knows how far ahead of the consumer the pool read (items in flight)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.taken = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.taken += 1
            yield item


def window_arrays(ahead: float, extra: int) -> float:
    """The in-flight window in arrays: ``ahead`` items in flight, each an input and an output
    array, plus ``extra`` (the result in the consumer's hand; for a lazy input also the segment
    the generator has just made)."""
    return 2 * ahead + extra


class BigArrays(Workload):
    """How fast do big arrays travel, and what do they cost the parent's memory? 64 tasks, each an
    8 MiB float32 array in and one out (a * 2.0): payload MB/s (in + out) and peak RSS growth.

    Every peer is consumed lazily in order (its imap, or Executor.map's iterator) and the parent
    reads every result in full (a float64 sum, checked against the input's) before dropping it, as
    a real consumer would; that also counts shared-memory pages in the parent's RSS. RSS is sampled
    every 5 ms; growth is the worst run's peak above the run's baseline (inputs already built).
    "ahead" is how many inputs the pool had taken beyond the results consumed (its window).
    """

    name = "big-arrays"
    SAMPLE_S = 0.005
    WINDOW_EXTRA = 1  # arrays beyond those in flight: the result in the consumer's hand

    def params(self, quick: bool) -> dict[str, Any]:
        array_bytes = 8 * MIB
        return {"tasks": 16 if quick else 64, "array_bytes": array_bytes,
                **memcpy_bandwidth(array_bytes)}

    def facts(self, params: dict[str, Any]) -> str:
        payload = params["tasks"] * 2 * params["array_bytes"] / MB
        return (f"{params['tasks']} x {params['array_bytes'] / MIB:.0f} MiB float32 in and out "
                f"({payload:,.0f} MB per run); physical limit: memcpy "
                f"{params['memcpy_mb_s']:,.0f} MB/s (np.copyto, 32 distinct 8 MiB arrays), one "
                f"copy of every payload byte {payload / params['memcpy_mb_s']:.2f} s")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return [
            PeerSpec("serial", "serial", "serial loop (no transfer: compute + check only)"),
            PeerSpec("ppe", "ppe", "ProcessPoolExecutor.map chunksize=1"),
            PeerSpec("mp", "mp", "multiprocessing.Pool.imap chunksize=1"),
            PeerSpec("loky", "loky", "loky executor.map chunksize=1"),
            PeerSpec("joblib", "joblib", 'joblib Parallel(return_as="generator"), memmapping'),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.imap (default chunks)"),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.map chunksize=1"),
            PeerSpec("dask", "dask", "dask client.map (arrays in the task graph)"),
            PeerSpec("stagepool", "stagepool", 'stagepool Engine.imap, shared memory ("1MiB")',
                     {"shm_threshold": "1MiB"}),
            PeerSpec("stagepool-pickle", "stagepool", "stagepool Engine.imap, pickled (shm 0)",
                     {"shm_threshold": 0}),
        ]

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        import numpy as np

        n = params["array_bytes"] // 4
        arrays = [np.random.default_rng(i).random(n, dtype=np.float32)
                  for i in range(params["tasks"])]
        return arrays, [float(a.sum(dtype=np.float64)) for a in arrays]

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        import numpy as np

        arrays, sums = state
        feed = _Counted(arrays)
        gc.collect()
        sampler = RssSampler(self.SAMPLE_S)
        began = time.perf_counter()
        done = ahead = 0
        for i, out in enumerate(peer.imap(workloads.double_array, feed)):
            # a * 2.0 is exact in float32, and so is the float64 sum of the doubled values
            check(out.shape == arrays[i].shape and out.dtype == np.float32
                  and float(out.sum(dtype=np.float64)) == 2 * sums[i], f"array {i} * 2.0")
            done += 1
            ahead = max(ahead, feed.taken - done)
            del out
        seconds = time.perf_counter() - began
        growth = sampler.stop()
        check(done == len(arrays), f"{done} of {len(arrays)} arrays came back")
        nbytes = arrays[0].nbytes
        return {"seconds": seconds, "items": done, "payload_mb": 2 * done * nbytes / MB,
                "rss_growth_mb": growth / MB, "ahead": ahead, "array_bytes": nbytes}

    def aggregate(self, warmup: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
        extra = super().aggregate(warmup, runs)
        every = [*warmup, *runs]  # a memory bound is a worst case, the first run included
        extra["rss_growth_mb"] = max(r["rss_growth_mb"] for r in every)
        extra["ahead"] = max(r["ahead"] for r in every)
        return extra

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        rate = e["payload_mb"] / row["median_s"]
        share = rate / params["memcpy_mb_s"]
        return rate, (f"{rate:,.0f} MB/s ({share:.0%} of memcpy), RSS +{e['rss_growth_mb']:,.0f} MB, "
                      f"ahead {e['ahead']:.0f}")

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return row["extra"]["payload_mb"], "MB"

    def judged(self, row: dict[str, Any]) -> bool:
        return row["key"] == "stagepool"  # the pickle-path row is a reference

    def targets(self, params: dict[str, Any]) -> list[Target]:
        def vs_ppe(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            r = row.get("vs_ppe")
            return (None, "no PPE row") if r is None else (r >= 3.0, f"{r:.2f}x")

        def vs_joblib(row: dict[str, Any],
                      rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            joblib = rows.get("joblib")
            if not joblib or joblib["status"] != "ok":
                return None, "no joblib row"
            r = joblib["median_s"] / row["median_s"]
            return r >= 1.5, f"{r:.2f}x"

        def rss(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            e = row["extra"]
            arrays = window_arrays(e["ahead"], self.WINDOW_EXTRA)
            window = arrays * e["array_bytes"] / MB
            return (e["rss_growth_mb"] <= window,
                    f"+{e['rss_growth_mb']:,.0f} MB, window {arrays:.0f} arrays = {window:,.0f} MB")

        return [Target("MB/s >= 3x PPE", vs_ppe), Target("MB/s >= 1.5x joblib", vs_joblib),
                Target("peak RSS growth <= in-flight window", rss)]


# ---- big-stream ---------------------------------------------------------------------------------

class _Segments:
    """``n`` float32 arrays of ``nbytes`` (array i is full of i), each made only when a pool takes
    it, as a decoder would produce segments; counts how many were taken."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.n, self.nbytes = n, nbytes
        self.taken = 0

    def __iter__(self) -> Iterator[Any]:
        import numpy as np

        for i in range(self.n):
            self.taken += 1
            yield np.full(self.nbytes // 4, i, dtype=np.float32)


class BigStream(BigArrays):
    """Does the parent's memory stay bounded while 2 GiB of segments stream through? 256 x 8 MiB
    float32 arrays made one at a time by a generator, doubled by the workers, read in order.

    The same measurements as big-arrays (payload MB/s in + out, peak RSS growth sampled every 5 ms,
    "ahead"), but nothing exists before the pool asks for it: a pool that reads its whole input
    first holds all of it. A lazy pool's parent holds its in-flight window: "ahead" inputs and as
    many outputs, plus the result in the consumer's hand and the segment the generator has just
    made (measured: stagepool's parent peaks at 5 inputs as ordinary arrays and 5 results as
    mapped segments with "ahead" 4). The target is the issue's: growth bounded by that window,
    not by the input (under 5% of it).
    """

    name = "big-stream"
    WINDOW_EXTRA = 2

    def params(self, quick: bool) -> dict[str, Any]:
        return {**super().params(quick), "tasks": 32 if quick else 256}

    def facts(self, params: dict[str, Any]) -> str:
        data = params["tasks"] * params["array_bytes"] / MIB
        return (f"{params['tasks']} x {params['array_bytes'] / MIB:.0f} MiB float32 made lazily "
                f"({data:,.0f} MiB in, as much out); memcpy {params['memcpy_mb_s']:,.0f} MB/s")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        eager = ("Executor.map submits the whole input before it yields a result: the same as the "
                 "ProcessPoolExecutor row (all of the input in the parent)")
        return [
            PeerSpec("ppe", "ppe", "ProcessPoolExecutor.map chunksize=1 (reads the whole input)"),
            PeerSpec("mp", "mp", "multiprocessing.Pool.imap chunksize=1"),
            PeerSpec("loky", "loky", "loky executor.map", na=eager),
            PeerSpec("joblib", "joblib", 'joblib Parallel(return_as="generator"), memmapping'),
            PeerSpec("mpire", "mpire", "mpire WorkerPool.imap (default chunks)"),
            PeerSpec("pebble", "pebble", "pebble ProcessPool.map",
                     na="ProcessPool.map schedules every chunk of the input before it returns"),
            PeerSpec("dask", "dask", "dask client.map",
                     na="client.map turns the whole input into futures before anything runs"),
            PeerSpec("stagepool", "stagepool", 'stagepool Engine.imap, shared memory ("1MiB")',
                     {"shm_threshold": "1MiB"}),
        ]

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        return 1, min(repeat, 2)  # 4 GiB moved per run: two runs tell the memory story

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        return params["tasks"], params["array_bytes"]

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        n, nbytes = state
        feed = _Segments(n, nbytes)
        gc.collect()
        sampler = RssSampler(self.SAMPLE_S)
        began = time.perf_counter()
        done = ahead = 0
        for i, out in enumerate(peer.imap(workloads.double_array, iter(feed))):
            check(out.shape == (nbytes // 4,) and float(out[0]) == float(out[-1]) == 2.0 * i,
                  f"segment {i} * 2.0")
            done += 1
            ahead = max(ahead, feed.taken - done)
            del out
        seconds = time.perf_counter() - began
        growth = sampler.stop()
        check(done == n, f"{done} of {n} segments came back")
        return {"seconds": seconds, "items": done, "payload_mb": 2 * done * nbytes / MB,
                "rss_growth_mb": growth / MB, "ahead": ahead, "array_bytes": nbytes}

    def targets(self, params: dict[str, Any]) -> list[Target]:
        streamed = params["tasks"] * params["array_bytes"] / MB

        def rss(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
            # Bounded by the window, not by the input: a few arrays, never a share of the stream.
            e = row["extra"]
            arrays = window_arrays(e["ahead"], self.WINDOW_EXTRA)
            return (e["rss_growth_mb"] < 0.05 * streamed,
                    f"+{e['rss_growth_mb']:,.0f} MB of {streamed:,.0f} MB in; window {arrays:.0f} "
                    f"arrays = {arrays * e['array_bytes'] / MB:,.0f} MB")

        return [Target("peak RSS growth < 5% of the input streamed", rss)]


# ---- media --------------------------------------------------------------------------------------

class Media(Workload):
    """How fast does the demo's real media stage run? 150 two-second segments through
    stagepool.demo.process_segment: segments per second and realtime factor.

    The stage is the one ``stagepool demo`` runs (validate, stereo to mono, resample 48 -> 16 kHz,
    spectral noise gate, loudness, voice activity). The segments (48 kHz stereo float32, clean) are
    synthesised in each row's process before the pool starts, identically for every peer. Realtime
    factor = seconds of audio processed per wall second. The physical limit is the serial loop's
    time / workers; it is not a hard bound here: stagepool's workers run with glibc's malloc tuned
    (MALLOC_MMAP_THRESHOLD_), which on its own makes this stage ~30% faster than a plain process
    (measured: 14.5 vs 21 ms per segment in the same loop).
    """

    name = "media"

    def params(self, quick: bool) -> dict[str, Any]:
        from stagepool.demo import process_segment, synth_segment

        segment_s = 2.0
        sample = synth_segment(0, segment_seconds=segment_s)
        process_segment(sample)  # warm numpy's FFT plans and caches
        calls = []
        for _ in range(5):
            began = time.perf_counter()
            process_segment(sample)
            calls.append(time.perf_counter() - began)
        return {"segments": 20 if quick else 150, "segment_s": segment_s,
                "segment_bytes": int(sample.samples.nbytes),
                "serial_segment_s": statistics.median(calls)}

    def facts(self, params: dict[str, Any]) -> str:
        n, w = params["segments"], params["workers"]
        audio = n * params["segment_s"]
        limit = n * params["serial_segment_s"] / w
        return (f"{n} segments x {params['segment_s']:g} s ({params['segment_bytes'] / 1e3:,.0f} KB "
                f"each), {audio:,.0f} s of audio; serial {params['serial_segment_s'] * 1e3:.1f} ms "
                f"per segment (median of 5); physical limit (serial / {w} workers) {limit:.2f} s "
                f"= {audio / limit:,.0f}x realtime (stagepool's workers tune malloc, which speeds "
                "this stage up by itself: see the docstring)")

    def specs(self, params: dict[str, Any]) -> list[PeerSpec]:
        return map_specs()

    def schedule(self, spec: PeerSpec, repeat: int) -> tuple[int, int]:
        return (0, 1) if spec.peer == "serial" else (1, repeat)

    def prepare(self, params: dict[str, Any], spec: PeerSpec) -> Any:
        from stagepool.demo import process_segment, synth_segment

        segments = [synth_segment(i, segment_seconds=params["segment_s"])
                    for i in range(params["segments"])]
        return segments, process_segment(segments[-1])

    def run(self, peer: Peer, state: Any) -> dict[str, Any]:
        from stagepool.demo import process_segment

        segments, last = state
        seconds, values = timed_map(peer, process_segment, segments)
        check(len(values) == len(segments) and [v.index for v in values] == list(range(len(values)))
              and values[-1] == last, "segment features in order, the last one as computed here")
        return {"seconds": seconds, "segments": len(values),
                "audio_s": sum(v.duration_s for v in values)}

    def metric(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str]:
        e = row["extra"]
        rate = e["segments"] / row["median_s"]
        return rate, f"{rate:,.1f} segments/s, {e['audio_s'] / row['median_s']:,.0f}x realtime"

    def work(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[float, str] | None:
        return row["extra"]["segments"], "segments"
