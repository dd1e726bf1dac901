"""A pipeline run's progress: per-stage counts kept as the groups finish segments, shown as one
bar per stage (on a terminal) or a plain line (on a log or a pipe), and given to ``on_progress``.

    group thread i --absorb--> StageMeter.stages_done(seg, its stages)   per-stage done / failed
    last group     ----------> StageMeter.segment_done(seg)             segments done / failed
          each call, under one lock -> every view: bars | line | callback(Progress)

A stage is done with a segment once it has an outcome there (ok, failed, or skipped because an
upstream stage failed), so every stage reaches the total. The ETA is the slowest stage's: each
stage's remaining segments at its own pace so far, the largest of them (unknown while a stage
has done nothing).

A view that raises (a callback's bug, a bar on a closed pipe) fails alone, as a batch's sinks
do (``_progress.Shield``): logged once, dropped, and the run goes on.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from .._progress import Progress, Shield, StageProgress, estimate_eta, stage_bars
from ._translate import Segment

__all__ = ["StageMeter", "make_meter"]

LINE_EVERY = 10.0  # seconds between plain lines at most (and one per 10% of the segments)


class _View(Protocol):
    def show(self, now: Progress) -> None: ...
    def close(self, now: Progress) -> None: ...


class StageMeter:
    """The per-stage counts of one run, and the views that watch them. Thread-safe."""

    def __init__(self, names: Sequence[str], total: int | None,
                 views: list[tuple[_View, Shield]]) -> None:
        self.names, self.total = list(names), total
        self.done = dict.fromkeys(self.names, 0)
        self.failed = dict.fromkeys(self.names, 0)
        self.segments = self.segments_failed = 0
        self._views = views
        self._lock = threading.Lock()
        self._start = time.perf_counter()

    def stages_done(self, seg: Segment, names: Sequence[str]) -> None:
        """A group is done with ``seg``: count its stages' outcomes."""
        with self._lock:
            for name in names:
                self.done[name] += 1
                self.failed[name] += seg.stages[name].kind not in ("ok", "skipped")
            self._show()

    def segment_done(self, seg: Segment) -> None:
        """Every stage is done with ``seg``."""
        with self._lock:
            self.segments += 1
            self.segments_failed += any(st.kind != "ok" for st in seg.stages.values())
            self._show()

    def reading(self) -> Progress:
        """The run's :class:`Progress` now (per stage in ``stages``)."""
        elapsed = time.perf_counter() - self._start
        stages = {name: StageProgress(self.done[name], self.failed[name],
                                      estimate_eta(self.done[name], self.total, elapsed))
                  for name in self.names}
        etas = [s.eta for s in stages.values()]
        eta = None if None in etas else max(etas, default=None)  # type: ignore[type-var]
        return Progress(self.segments, self.segments_failed, self.total, elapsed, eta=eta,
                        stages=stages)

    def _show(self) -> None:
        now = self.reading()
        for view, shield in self._views:
            shield(view.show, now)

    def close(self) -> None:
        """The run ended (also on error or cancellation): the views' last word."""
        with self._lock:
            now = self.reading()
            for view, shield in self._views:
                shield(view.close, now)


def make_meter(names: Sequence[str], total: int | None, *, progress: bool,
               on_progress: Callable[[Progress], object] | None, desc: str,
               file: TextIO | None = None) -> StageMeter | None:
    """The run's meter, or None when nobody watches (then nothing is counted)."""
    views: list[tuple[_View, Shield]] = []
    if progress:
        shield = Shield("the progress bar")
        out = file or sys.stderr
        bars = shield(stage_bars, list(names), total, out)  # a closed stderr: no bar, logged
        if not shield.broken:
            views.append((_Line(desc, out) if bars is None else _Bars(bars), shield))
    if on_progress is not None:
        views.append((_Callback(on_progress), Shield(f"the on_progress callback {on_progress!r}")))
    return StageMeter(names, total, views) if views else None


class _Callback:
    def __init__(self, fn: Callable[[Progress], object]) -> None:
        self._fn = fn

    def show(self, now: Progress) -> None:
        self._fn(now)

    def close(self, now: Progress) -> None:
        pass  # its last show already had the final counts


class _Line:
    """``desc: decode 120/500 | resample 118/500 | ...; 98 done, 2 failed, 9.8 seg/s, ETA 41 s``
    every 10% of the segments or 10 s, and at the end."""

    def __init__(self, desc: str, file: TextIO) -> None:
        self._desc, self._file = desc, file
        self._next_share = 0.1
        self._last = time.perf_counter()
        self._printed: tuple[int, ...] = ()

    def show(self, now: Progress) -> None:
        clock = time.perf_counter()
        share = now.done / now.total if now.total else 0.0
        if share >= self._next_share or clock - self._last >= LINE_EVERY:
            self._next_share = share + 0.1
            self._last = clock
            self._print(now)

    def close(self, now: Progress) -> None:
        if _counts(now) != self._printed and any(_counts(now)):  # the end, unless just printed
            self._print(now)

    def _print(self, now: Progress) -> None:
        self._printed = _counts(now)
        print(f"{self._desc}: {format_line(now)}", file=self._file, flush=True)


def format_line(now: Progress) -> str:
    """The stages and the segments of ``now`` on one line."""
    total = "" if now.total is None else f"/{now.total}"
    stages = " | ".join(f"{name} {s.done}{total}" + (f" ({s.failed} failed)" if s.failed else "")
                        for name, s in (now.stages or {}).items())
    tail = [f"{now.done}{total} segments done", f"{now.failed} failed", f"{now.rate:,.1f} seg/s"]
    if now.eta is not None and (now.total is None or now.done < now.total):
        tail.append(f"ETA {now.eta:,.0f} s")
    return f"{stages}; {', '.join(tail)}"


def _counts(now: Progress) -> tuple[int, ...]:
    return (now.done, *(s.done for s in (now.stages or {}).values()))


class _Bars:
    """A tqdm bar per stage; the slowest stage's bar carries the pipeline's ETA."""

    def __init__(self, bars: list[Any]) -> None:
        self._bars = bars

    def show(self, now: Progress) -> None:
        stages = now.stages or {}
        slowest = max(stages, key=lambda n: stages[n].eta or 0.0, default=None)
        for bar, (name, s) in zip(self._bars, stages.items(), strict=True):
            parts = [f"{s.failed} failed"] if s.failed else []
            if name == slowest and now.eta is not None:
                parts.append(f"ETA {now.eta:,.0f} s (slowest)")
            bar.set_postfix_str(", ".join(parts), refresh=False)
            bar.update(s.done - bar.n)

    def close(self, now: Progress) -> None:
        for bar in reversed(self._bars):  # the bottom one first: the cursor ends below them all
            bar.close()
