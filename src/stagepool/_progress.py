"""Progress reporting: a small sink protocol and its adapters (the only tqdm import).

The engine calls ``sink.update(done, failed)`` once per finished chunk, from the thread that runs
the batch, and ``sink.close()`` exactly once at the end (also on error or cancellation).

A sink that fails (an ``on_progress`` callback that raises, a bar writing to a closed pipe) fails
alone: its first exception is logged as a warning on the ``"stagepool"`` logger, with its
traceback, the sink is not called again for that batch, and the batch goes on. Progress is an
observer: its failure must never cost the results (as with ``concurrent.futures``' done-callbacks,
which are logged too, a log record cannot itself raise into the batch as a warning made an
error by ``-W error`` would).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TextIO, TypeVar

from ._config import check_bool

__all__ = ["Meter", "Progress", "ProgressSink", "Reading", "Shield", "StageProgress",
           "check_progress_options", "estimate_eta", "make_sink", "stage_bars"]

_log = logging.getLogger("stagepool")
T = TypeVar("T")


class Reading(NamedTuple):
    """What a batch with cost hints measured so far (see ``_costs.Arrangement``)."""

    unit: str | None  # "s": amounts are seconds of media; None: no unit asked for
    amount_done: float  # in ``unit`` (size=, else cost=), of the items with an outcome
    # With cost= every amount is read first (known-length input); size= alone reads lazily,
    # so the total is then the mean amount so far x the item count (None for a stream).
    amount_total: float | None
    cost_done: float  # in cost= units (what predicts time)
    cost_total: float | None


class Meter(Protocol):
    def reading(self) -> Reading: ...


def estimate_eta(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left if the rest goes at the pace so far: ``elapsed x (total - done) / done``.

    ``done`` and ``total`` are in any unit of work (items, or cost: a cost-weighted estimate);
    None while nothing is done or the total is unknown."""
    if total is None or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (total - done) / done)


class StageProgress(NamedTuple):
    """One pipeline stage in a :class:`Progress`: segments it is done with (ok, failed, or
    skipped because an upstream stage failed), those that failed in it, and its ETA at its own
    pace so far (None while unknown)."""

    done: int
    failed: int
    eta: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """What an ``on_progress`` callback receives after each finished chunk.

    With ``unit="s"`` (and ``cost=`` or ``size=``), ``amount_done`` / ``amount_total`` are
    seconds of media; ``eta`` is weighted by ``cost=`` when given (else by items)."""

    done: int  # items with an outcome (ok or failed)
    failed: int
    total: int | None  # None for an iterator of unknown length
    elapsed: float  # seconds since the batch started
    unit: str | None = None
    amount_done: float | None = None  # in ``unit``; None without unit
    amount_total: float | None = None  # in ``unit`` (size= alone: estimated); None if unknown
    eta: float | None = None  # estimated seconds left; None while unknown
    # A pipeline's stages by name, in declaration order (None for a batch): ``done`` and
    # ``failed`` above count whole segments, and ``eta`` is the slowest stage's.
    stages: dict[str, StageProgress] | None = None

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def realtime_factor(self) -> float | None:
        """Seconds of media done per second of wall time (``unit="s"``), else None."""
        if self.unit != "s" or self.amount_done is None or self.elapsed <= 0:
            return None
        return self.amount_done / self.elapsed


def snapshot(done: int, failed: int, total: int | None, elapsed: float,
             meter: Meter | None) -> Progress:
    """The :class:`Progress` of a batch now (``meter``: its cost hints' reading, if any)."""
    if meter is None:
        return Progress(done, failed, total, elapsed, eta=estimate_eta(done, total, elapsed))
    r = meter.reading()
    eta = estimate_eta(r.cost_done, r.cost_total, elapsed) if r.cost_total else \
        estimate_eta(done, total, elapsed)
    if r.unit is None:
        return Progress(done, failed, total, elapsed, eta=eta)
    return Progress(done, failed, total, elapsed, r.unit, r.amount_done, r.amount_total, eta)


class ProgressSink(Protocol):
    def update(self, done: int, failed: int) -> None: ...
    def close(self) -> None: ...


class Shield:
    """Calls one user-facing hook until it first raises; then logs that, once, and drops it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.broken = False

    def __call__(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or None once it has raised."""
        if self.broken:
            return None
        try:
            return fn(*args)
        except Exception:  # not KeyboardInterrupt: a Ctrl-C in the batch's thread stops the batch
            self.broken = True
            _log.warning("%s raised; it is not called again for this batch, which goes on "
                         "(no result is lost)", self.what, exc_info=True)
            return None


class _Shielded:
    """A sink that fails alone (see the module's docstring)."""

    def __init__(self, sink: ProgressSink, shield: Shield) -> None:
        self._sink, self._shield = sink, shield

    def update(self, done: int, failed: int) -> None:
        self._shield(self._sink.update, done, failed)

    def close(self) -> None:
        self._shield(self._sink.close)


class _Fanout:
    def __init__(self, sinks: list[ProgressSink]) -> None:
        self._sinks = sinks

    def update(self, done: int, failed: int) -> None:
        for sink in self._sinks:
            sink.update(done, failed)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


class _Callback:
    def __init__(self, fn: Callable[[Progress], object], total: int | None,
                 meter: Meter | None) -> None:
        self._fn, self._total, self._start = fn, total, time.perf_counter()
        self._meter = meter

    def update(self, done: int, failed: int) -> None:
        self._fn(snapshot(done, failed, self._total, time.perf_counter() - self._start,
                          self._meter))

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar on a terminal; on a log file or pipe, a plain line every 10% or 10 s.

    With a meter in seconds of media (``unit="s"``) the bar counts media seconds and shows the
    realtime factor (media seconds per wall second) and a cost-weighted ETA."""

    def __init__(self, total: int | None, desc: str | None, file: TextIO,
                 meter: Meter | None = None) -> None:
        self._total, self._desc, self._file = total, desc or "items", file
        self._meter = meter  # cost hints: a cost-weighted ETA, and media seconds with a unit
        media = meter is not None and meter.reading().unit is not None
        self._start = self._last_line = time.perf_counter()
        self._next_share = 0.1
        self._done = self._failed = 0
        self._shown = 0.0  # what the bar shows: items, or media seconds with a meter
        self._lined = -1.0  # ``_shown`` at the last plain line
        self._bar: Any = None
        if file.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None if media else total, desc=desc,
                             unit="s" if media else "item", file=file, dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, done: int, failed: int) -> None:
        now = snapshot(done, failed, self._total, time.perf_counter() - self._start, self._meter)
        shown = float(done) if now.amount_done is None else now.amount_done
        if self._bar is not None:
            self._tqdm(now, shown, failed)
        self._done, self._failed, self._shown = done, failed, shown
        if self._bar is None:
            self._maybe_line(now)

    def _tqdm(self, now: Progress, shown: float, failed: int) -> None:
        bar = self._bar
        if now.amount_total is not None and bar.total != now.amount_total:
            bar.total = now.amount_total  # known once the input is read
        bar.update(shown - self._shown)
        if now.unit is not None:  # tqdm's own rate and ETA are in items: say it in media
            bar.set_postfix_str(_postfix(now), refresh=False)
        elif failed != self._failed:
            bar.set_postfix(failed=failed, refresh=False)

    def _maybe_line(self, now: Progress) -> None:
        clock = time.perf_counter()
        total = self._total if now.amount_total is None else now.amount_total
        share = self._shown / total if total else 0.0
        if share >= self._next_share or clock - self._last_line >= 10.0:
            self._next_share = share + 0.1
            self._last_line = clock
            self._line(now)

    def _line(self, now: Progress) -> None:
        if now.unit is None:
            total = f"/{self._total}" if self._total is not None else ""
            head = f"{self._done}{total} done"
        else:
            total = f"/{now.amount_total:,.1f}" if now.amount_total is not None else ""
            head = f"{now.amount_done or 0.0:,.1f}{total} {now.unit} of media done ({self._done} items)"
        self._lined = self._shown
        print(f"{self._desc}: {head}, {_postfix(now)}", file=self._file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._done and self._shown != self._lined:  # the end, unless just printed
            self._line(snapshot(self._done, self._failed, self._total,
                                time.perf_counter() - self._start, self._meter))


def stage_bars(names: list[str], total: int | None, file: TextIO) -> list[Any] | None:
    """One tqdm bar per name, stacked (a pipeline's stages), or None when ``file`` is not a
    terminal (the caller then prints plain lines). The bars show no ETA of their own: the
    caller puts the pipeline's (the slowest stage's) in a postfix."""
    if not file.isatty():
        return None
    from tqdm.auto import tqdm

    width = max(map(len, names), default=0)
    count = "{n_fmt}" if total is None else "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
    return [tqdm(total=total, desc=name.ljust(width), unit="seg", file=file, position=i,
                 dynamic_ncols=True, smoothing=0.1,
                 bar_format=f"{{desc}} {count} [{{elapsed}}, {{rate_fmt}}{{postfix}}]")
            for i, name in enumerate(names)]


def _postfix(now: Progress) -> str:
    parts = [f"{now.failed} failed"]
    factor = now.realtime_factor
    parts.append(f"{now.rate:,.1f} items/s" if factor is None else f"{factor:,.1f}x realtime")
    if now.eta is not None and (now.total is None or now.done < now.total):
        parts.append(f"ETA {now.eta:,.0f} s")
    return ", ".join(parts)


def check_progress_options(*, progress: object, on_progress: object, desc: object) -> None:
    """Refuse bad per-call progress options when the call is made, before any item runs: left to
    the sink, a non-callable ``on_progress`` would fail only after the first chunk had run.

    Raises ``TypeError`` naming the argument. ``progress`` None means "the engine's setting".
    """
    if progress is not None:
        check_bool(progress, "progress")
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress must be a callable taking a Progress, or None; "
                        f"not {on_progress!r}")
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a str or None, not {desc!r}")


def make_sink(
    *,
    progress: bool,
    on_progress: Callable[[Progress], object] | None,
    total: int | None,
    desc: str | None,
    file: TextIO | None = None,
    meter: Meter | None = None,
) -> ProgressSink | None:
    """The sink for one batch, or None when nobody is watching (the fast path).

    Raises ``TypeError`` naming the argument for a bad option (see
    :func:`check_progress_options`), before the batch starts.
    """
    check_progress_options(progress=progress, on_progress=on_progress, desc=desc)
    sinks: list[ProgressSink] = []
    if progress:
        shield = Shield("the progress bar")
        bar = shield(_Bar, total, desc, file or sys.stderr, meter)  # a closed stderr: no bar, logged
        if bar is not None:
            sinks.append(_Shielded(bar, shield))
    if on_progress is not None:
        sinks.append(_Shielded(_Callback(on_progress, total, meter),
                               Shield(f"the on_progress callback {on_progress!r}")))
    if not sinks:
        return None
    return sinks[0] if len(sinks) == 1 else _Fanout(sinks)


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (Progress, StageProgress):
    _public.__module__ = "stagepool"
