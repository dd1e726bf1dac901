"""Item keys and resumable batches: ``key=`` and ``checkpoint=`` of ``map``, ``imap`` and the
async calls, built above the batch driver.

    items --_Feed--> each item keyed (``key=``, or index + content digest with a checkpoint);
      |              one the checkpoint already finished is restored from it and set aside
      v
    KeyedBatch: a Batch of the remaining items (batch index j is input index route[j]);
      |         each final piece is journaled (one write per chunk) before it is passed on
      v
    merged by input index: report_of (map) / outcome_lists_of (imap, async): restored and fresh
    outcomes, each carrying its key

A batch without ``key=`` or ``checkpoint=`` is a plain :class:`Batch`: none of this runs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from array import array
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast, get_args

from ._answers import Fail, Piece
from ._backends import Backend
from ._batch import Batch, BatchSpec
from ._fingerprint import content_digest, describe_callable
from ._journal import Entry, Journal, Mismatch, check_checkpoint
from ._outcome import BatchReport, Failure, Kind, Outcome, ReportBuilder, make_outcome
from ._streams import outcome_lists, run_to_report

__all__ = ["KeyPlan", "KeyedBatch", "key_plan", "new_batch", "outcome_lists_of", "report_of"]

JOURNALED_KINDS = frozenset({"ok", "error", "timeout", "crash", "serialization"})
MakeBatch = Callable[[], Batch]


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPlan:
    """One call's validated ``key=`` / ``checkpoint=`` options."""

    key: Callable[[Any], Hashable] | None
    checkpoint: Path | None
    finished: frozenset[str]
    mismatch: Mismatch
    header: dict[str, str]


def key_plan(fn: Callable[..., Any], *, key: Callable[[Any], Hashable] | None,
             checkpoint: str | os.PathLike[str] | None, finished_kinds: Iterable[str] | None,
             checkpoint_mismatch: str) -> KeyPlan | None:
    """Validate the options at the call (the checkpoint's directory and header included);
    None when the call has neither a key nor a checkpoint."""
    if checkpoint_mismatch not in get_args(Mismatch):
        raise ValueError(f"checkpoint_mismatch must be one of {get_args(Mismatch)}, "
                         f"not {checkpoint_mismatch!r}")
    if checkpoint is None:
        if finished_kinds is not None or checkpoint_mismatch != "refuse":
            raise ValueError("finished_kinds= and checkpoint_mismatch= need checkpoint=")
        if key is None:
            return None
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable of the item, not {type(key).__name__}")
    header = {"function": describe_callable(fn),
              "keys": "index+content" if key is None else f"key={describe_callable(key)}"}
    path = None
    if checkpoint is not None:
        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"checkpoint must be a directory path, not {type(checkpoint).__name__}")
        path = Path(checkpoint)
        check_checkpoint(path, header, checkpoint_mismatch)  # type: ignore[arg-type]
    return KeyPlan(key, path, _finished(finished_kinds), checkpoint_mismatch,  # type: ignore[arg-type]
                   header)


def _finished(kinds: Iterable[str] | None) -> frozenset[str]:
    chosen = frozenset(("ok",) if kinds is None else (kinds,) if isinstance(kinds, str) else kinds)
    if "ok" not in chosen or not chosen <= JOURNALED_KINDS:
        raise ValueError(f"finished_kinds must include 'ok' and be among {sorted(JOURNALED_KINDS)}, "
                         f"not {sorted(chosen)}")
    return chosen


class _Feed(Iterator[Any]):
    """The items to run, read from the caller's: keys each one, sets aside what the checkpoint
    already finished. Raises (naming the item) for a key that raises, is unhashable, cannot be
    journaled, or repeats within a checkpointed batch."""

    def __init__(self, items: Iterable[Any], plan: KeyPlan, journal: Journal | None) -> None:
        self.it, self.plan, self.journal = iter(items), plan, journal
        self.seen = 0  # input items keyed
        self.taken = 0  # items passed on: the batch's indices
        self.route: dict[int, tuple[int, Any, Hashable]] = {}  # batch index -> input, keys
        self.restored: deque[Outcome[Any]] = deque()
        self.first: dict[Hashable, int] | None = {} if journal is not None else None

    def __next__(self) -> Any:
        while True:
            item = next(self.it)
            index = self.seen
            journal_key, key = self._key(item, index)
            self.seen += 1
            done = None if self.journal is None else \
                self.journal.finished(journal_key, self.plan.finished)
            if done is not None:
                self.restored.append(_restored(index, key, *done))
                continue
            self.route[self.taken] = (index, key, journal_key)
            self.taken += 1
            return item

    def _key(self, item: Any, index: int) -> tuple[Hashable, Any]:
        """(the journal's key, the outcome's key) of one item."""
        if self.plan.key is None:
            try:
                digest = content_digest(item)
            except Exception:  # it cannot be pickled: it fails as "serialization" when sent
                digest = b""
            return (index, digest), None
        try:
            key = self.plan.key(item)
        except Exception as exc:  # the callable's own failure, whatever its type: not a key's
            raise ValueError(f"key= raised for item {index}: {_with_cause(exc)}") from exc
        try:
            hash(key)
        except Exception as exc:
            raise TypeError(f"key= returned an unhashable value for item {index}: "
                            f"{type(exc).__name__}: {exc}; keys must be hashable (str, int, "
                            "tuple)") from exc
        if self.first is not None:
            self._unique(key, index)
        return key, key

    def _unique(self, key: Hashable, index: int) -> None:
        assert self.first is not None
        earlier = self.first.setdefault(key, index)
        if earlier != index:
            raise ValueError(f"key= returned {key!r} for item {index} and for item {earlier}: "
                             "keys must be unique within a checkpointed batch")
        try:
            blob = pickle.dumps(key)
        except Exception as exc:
            raise TypeError(f"key= returned {key!r} for item {index}, which cannot be pickled "
                            f"into the checkpoint: {type(exc).__name__}: {exc}") from exc
        if pickle.loads(blob) != key:  # a rerun compares the journal's copy with a new key
            raise ValueError(f"key= returned {key!r} for item {index}, which is not equal to "
                             "itself once read back from the checkpoint (a NaN inside?), so a "
                             "rerun could never find it; use keys of str, int and tuples of them")


def _with_cause(exc: BaseException) -> str:
    """``Type: message``, and the exception it came from when it was raised during another."""
    said = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return said if cause is None else f"{said} (caused by {type(cause).__name__}: {cause})"


def _restored(index: int, key: Any, kind: Kind, entry: Entry) -> Outcome[Any]:
    return make_outcome((index, kind == "ok", entry.value, entry.error,  # type: ignore[no-any-return]
                         kind, entry.traceback, entry.duration, entry.worker, entry.attempts,
                         key))


class KeyedBatch(Batch):
    """A batch of the items its checkpoint has not finished; journals each final piece.

    Opening raises :class:`CheckpointError` (journal written for another call, in use,
    corrupt); with a sized input every key is computed here, so a bad key raises before any
    item runs. The journal closes (synced) when :meth:`pieces` ends, however it ends."""

    def __init__(self, backend: Backend, spec: BatchSpec, plan: KeyPlan) -> None:
        self.journal = None if plan.checkpoint is None else \
            Journal(plan.checkpoint, plan.header, plan.mismatch)
        try:
            self.feed = _Feed(spec.items, plan, self.journal)
            items: Iterable[Any] = self.feed
            total = None
            if spec.total is not None:  # sized: key every item now, so a bad key raises early
                items = list(self.feed)
                total = len(items)
            super().__init__(backend, dataclasses.replace(spec, items=items, total=total))
        except BaseException:
            self.close_journal()
            raise

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def pieces(self) -> Generator[Piece, None, None]:
        inner = cast(Generator[Piece, None, None], super().pieces())  # a generator method
        try:
            for piece in inner:
                if self.journal is not None:
                    self.journal.append(self._records(piece))
                yield piece
        finally:
            inner.close()
            self.close_journal()

    def _records(self, piece: Piece) -> list[tuple[Hashable, Kind, Entry]]:
        route = self.feed.route
        if isinstance(piece, Fail):
            f = piece.failure
            if f.kind not in JOURNALED_KINDS:
                return []
            return [(route[piece.index][2], f.kind,
                     Entry(None, f.error, f.traceback, f.duration, f.worker, f.attempts))]
        start, values, durations, pid, tries, skip = piece
        return [(route[start + offset][2], "ok", Entry(value, None, None, durations[offset],
                                                       pid, tries))
                for offset, value in enumerate(values) if offset not in skip]

    # ---- merging by input index --------------------------------------------------------------

    def translate(self, fresh: list[Outcome[Any]], ordered: bool) -> list[Outcome[Any]]:
        """Fresh outcomes (batch indices) as the caller's, with the restored ones due before."""
        route, restored = self.feed.route, self.feed.restored
        out: list[Outcome[Any]] = []
        if not ordered:
            out.extend(restored)
            restored.clear()
        for outcome in fresh:
            index, key, _ = route.pop(outcome.index)
            while restored and restored[0].index < index:
                out.append(restored.popleft())
            out.append(outcome._replace(index=index, key=key))
        return out

    def merge(self, inner: BatchReport[Any]) -> BatchReport[Any]:
        """The caller's report: the batch's (by batch index) and the restored, by input index."""
        n, feed = self.feed.seen, self.feed
        builder = ReportBuilder(n)
        keys: list[Any] | None = None if feed.plan.key is None else [None] * n
        fresh = (outcome._replace(index=feed.route[j][0], key=feed.route[j][1])
                 for j, outcome in enumerate(inner))
        for outcome in (*feed.restored, *fresh):
            _place(builder, outcome)
            if keys is not None:
                keys[outcome.index] = outcome.key
        stats = dataclasses.replace(inner.stats, restored=len(feed.restored))
        return builder.build(n, stats, keys)


def _place(builder: ReportBuilder, o: Outcome[Any]) -> None:
    if o.ok:
        builder.place(o.index, [o.value], array("d", [o.duration]), o.worker or 0, o.attempts)
    else:
        assert o.error is not None
        builder.fail(o.index, Failure(o.kind, o.error, o.traceback, o.duration, o.worker,
                                      o.attempts))


# ---- what the calls use -------------------------------------------------------------------------


def new_batch(backend: Backend, spec: BatchSpec, plan: KeyPlan | None) -> Batch:
    return Batch(backend, spec) if plan is None else KeyedBatch(backend, spec, plan)


def report_of(batch: Batch) -> BatchReport[Any]:
    """:func:`run_to_report`, merged with what the checkpoint restored and keyed; a partial
    report attached to a failing source's exception is merged too."""
    if not isinstance(batch, KeyedBatch):
        return run_to_report(batch)
    try:
        inner = run_to_report(batch)
    except BaseException as exc:
        partial = getattr(exc, "report", None)
        if isinstance(partial, BatchReport):
            exc.report = batch.merge(partial)  # type: ignore[attr-defined]
        raise
    return batch.merge(inner)


def outcome_lists_of(make_batch: MakeBatch,
                     ordered: bool) -> Generator[list[Outcome[Any]], None, None]:
    """:func:`outcome_lists`, keyed and with the restored outcomes in their places. Closing
    it early closes the batch's (withdrawing what has not started)."""
    batch = make_batch()
    lists = outcome_lists(lambda: batch, ordered)
    if not isinstance(batch, KeyedBatch):
        yield from lists
        return
    error: Exception | None = None
    try:
        for fresh in lists:
            out = batch.translate(fresh, ordered)
            if out:
                yield out
    except Exception as exc:  # the items iterable failed: what was taken comes first
        error = exc
    finally:
        lists.close()
    if batch.feed.restored:  # restored after the last item that ran
        yield list(batch.feed.restored)
        batch.feed.restored.clear()
    if error is not None:
        raise error
