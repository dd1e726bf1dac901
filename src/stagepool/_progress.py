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
from typing import Any, Protocol, TextIO, TypeVar

from ._config import check_bool

__all__ = ["Progress", "ProgressSink", "Shield", "check_progress_options", "make_sink"]

_log = logging.getLogger("stagepool")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """What an ``on_progress`` callback receives after each finished chunk."""

    done: int  # items with an outcome (ok or failed)
    failed: int
    total: int | None  # None for an iterator of unknown length
    elapsed: float  # seconds since the batch started

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


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
    def __init__(self, fn: Callable[[Progress], object], total: int | None) -> None:
        self._fn, self._total, self._start = fn, total, time.perf_counter()

    def update(self, done: int, failed: int) -> None:
        self._fn(Progress(done, failed, self._total, time.perf_counter() - self._start))

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar on a terminal; on a log file or pipe, a plain line every 10% or 10 s."""

    def __init__(self, total: int | None, desc: str | None, file: TextIO) -> None:
        self._total, self._desc, self._file = total, desc or "items", file
        self._start = self._last_line = time.perf_counter()
        self._next_share = 0.1
        self._done = self._failed = 0
        self._bar: Any = None
        if file.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="item", file=file, dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, done: int, failed: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._done)
            if failed != self._failed:
                self._bar.set_postfix(failed=failed, refresh=False)
        self._done, self._failed = done, failed
        if self._bar is None:
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = time.perf_counter()
        share = self._done / self._total if self._total else 0.0
        if share >= self._next_share or now - self._last_line >= 10.0:
            self._next_share = share + 0.1
            self._last_line = now
            self._line(now)

    def _line(self, now: float) -> None:
        total = f"/{self._total}" if self._total is not None else ""
        rate = self._done / (now - self._start) if now > self._start else 0.0
        print(f"{self._desc}: {self._done}{total} done, {self._failed} failed, {rate:,.1f} items/s",
              file=self._file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._done and self._done != (self._total or 0) * self._next_share:
            self._line(time.perf_counter())


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
) -> ProgressSink | None:
    """The sink for one batch, or None when nobody is watching (the fast path).

    Raises ``TypeError`` naming the argument for a bad option (see
    :func:`check_progress_options`), before the batch starts.
    """
    check_progress_options(progress=progress, on_progress=on_progress, desc=desc)
    sinks: list[ProgressSink] = []
    if progress:
        shield = Shield("the progress bar")
        bar = shield(_Bar, total, desc, file or sys.stderr)  # a closed stderr: no bar, logged
        if bar is not None:
            sinks.append(_Shielded(bar, shield))
    if on_progress is not None:
        sinks.append(_Shielded(_Callback(on_progress, total),
                               Shield(f"the on_progress callback {on_progress!r}")))
    if not sinks:
        return None
    return sinks[0] if len(sinks) == 1 else _Fanout(sinks)


# Public classes name the package they are imported from, in reprs and tracebacks.
for _public in (Progress,):
    _public.__module__ = "stagepool"
