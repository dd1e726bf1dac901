"""Points 5-7 of issue 18 on real PyAV stages (the ``[media]`` extra; skipped cleanly without it):
FFmpeg's own warnings logged with worker and item, a decoder that hangs inside FFmpeg stopped with
its stack, and the decoder's threads sized by ``stagepool.worker_threads()``."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import pytest

MISSING = 'needs the [media] extra: pip install "stagepool[media]"'
av = pytest.importorskip("av", reason=MISSING, exc_type=ImportError)
pytest.importorskip("soundfile", reason=MISSING, exc_type=ImportError)
pytest.importorskip("scipy", reason=MISSING, exc_type=ImportError)

from benchmarks.media_real import (  # noqa: E402
    MediaReal,
    make_segments,
    missing_media,
    process_segment,
)

import stagepool as sp  # noqa: E402

WAIT = 120.0


@pytest.fixture(scope="module")
def segments() -> list[Any]:
    return make_segments(6.0, damaged=(2,))


@pytest.fixture(scope="module")
def eng() -> sp.Engine:
    with sp.Engine(workers=2) as engine:
        yield engine


def decode_noisily(blob: bytes) -> int:
    """Decode with FFmpeg's own logging on: a damaged file makes it complain on stderr."""
    import av as pyav

    pyav.logging.set_level(pyav.logging.WARNING)
    logging.basicConfig()  # PyAV hands FFmpeg's lines to Python logging: print them on stderr
    with pyav.open(io.BytesIO(blob)) as box:
        return sum(1 for _ in box.decode(video=0))


class Stalls(io.RawIOBase):
    """A source that stops delivering (a dead network mount): FFmpeg waits inside read()."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            time.sleep(0.05)


def decode_stalled(_: int) -> int:
    import av as pyav

    with pyav.open(Stalls(), format="mp4") as box:
        return sum(1 for _ in box.decode(video=0))


def decoder_threads(blob: bytes) -> tuple[int, int]:
    import av as pyav

    with pyav.open(io.BytesIO(blob)) as box:
        stream = box.streams.video[0]
        stream.thread_count = sp.worker_threads()
        frames = sum(1 for _ in box.decode(stream))
        return stream.thread_count, frames


def test_the_real_stage_runs_and_a_damaged_segment_fails_alone(eng: sp.Engine,
                                                                segments: list[Any]) -> None:
    report = eng.map(process_segment, segments, timeout=WAIT)
    assert [o.kind for o in report] == ["error" if s.index == 2 else "ok" for s in segments]
    assert [v[0] for v in report.values] == [s.index for s in segments if s.index != 2]


def test_ffmpeg_warnings_are_logged_with_worker_and_item(
        eng: sp.Engine, segments: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stagepool.worker")
    blobs = [s.video for s in segments[:4]]
    report = eng.map(decode_noisily, blobs, chunk_size=4, timeout=WAIT)
    assert report[2].kind == "error"
    assert isinstance(report[2].error, av.error.InvalidDataError)  # back as itself
    lines = [r for r in caplog.records if r.name == "stagepool.worker"]
    from_damaged = [r for r in lines if r.item == 2]  # type: ignore[attr-defined]
    assert from_damaged, [r.getMessage() for r in lines]
    assert all(r.worker == report[2].worker for r in from_damaged)  # type: ignore[attr-defined]
    assert all(r.getMessage().startswith(f"worker {report[2].worker}, item 2: ")
               for r in from_damaged)


def test_a_decoder_stuck_in_ffmpeg_is_stopped_with_its_stack(eng: sp.Engine) -> None:
    report = eng.map(decode_stalled, [0], timeout=2.0)
    outcome = report[0]
    assert outcome.kind == "timeout"
    assert "stuck in readinto (" in str(outcome.error)  # FFmpeg called back into Python there
    assert "decode_stalled" in (outcome.traceback or "")
    assert 1.8 <= outcome.duration < 60
    assert eng.map(process_segment, [make_segments(0.5, ())[0]], timeout=WAIT).ok


def test_the_decoder_gets_the_workers_thread_budget(segments: list[Any]) -> None:
    share = max(1, sp.plan_workers().cpus // 2)
    with sp.Engine(workers=2) as engine:
        report = engine.map(decoder_threads, [segments[0].video, segments[1].video],
                            chunk_size=1, timeout=WAIT)
    assert [v[0] for v in report.values] == [share, share]
    assert all(v[1] > 0 for v in report.values)


def test_the_benchmark_workload_says_how_to_install_the_extra_when_it_is_missing() -> None:
    assert missing_media() is None  # installed here (else this module is skipped)
    rows = MediaReal().specs({"workers": 2, "missing": 'needs the [media] extra: pip install x'})
    assert rows and all(row.na and "[media]" in row.na for row in rows)
