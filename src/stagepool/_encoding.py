"""What a batch sends: a lot's items encoded by the backend's codec, or the failures of exactly
the items that cannot go.

    Lot --fn encodes?-----no--> every item: "serialization" (the function cannot be pickled)
        --timeouts?-------bad--> that item: "error" (a callable timeout or cost hint raised or
                                 returned junk)
        --items encode?---no---> one item: "serialization"; several: each item on its own, so
                                 exactly the items that cannot be encoded fail
        --> Ready(lot, encoded, timeouts): what ``Batch`` turns into a backend ``Task``

A Ctrl-C while pickling is not an item's failure: ``KeyboardInterrupt`` propagates and stops the
batch (it used to be swallowed, and the batch went on re-pickling item by item).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ._answers import Lot
from ._backends import Codec, Encoded, OverBudget
from ._config import Timeout, item_timeouts
from ._errors import SerializationError
from ._outcome import Kind

__all__ = ["LotEncoder", "Ready"]


class Ready(NamedTuple):
    """A lot that can go: its encoded items and each item's time limit (None: no limit)."""

    lot: Lot
    encoded: Encoded
    timeouts: tuple[float, ...] | None


# What the encoder reports for an item that cannot go: (index, kind, error, runs so far).
Final = Callable[[int, Kind, Exception, int], None]


class LotEncoder:
    """Encodes one batch's lots: ``fn`` once, each lot's items as it goes out."""

    def __init__(self, codec: Codec, fn: Callable[[Any], Any], timeout: Timeout, arena: int,
                 final: Final, label: Callable[[int], int],
                 refusal: Callable[[int, int], Exception | None] | None = None) -> None:
        """``label``: an item's input index from its position (they differ when cost hints
        reorder a batch); ``refusal``: the error of a position whose cost hint failed."""
        self.codec, self.fn, self.timeout, self.arena, self.final = codec, fn, timeout, arena, final
        self.label, self.refusal = label, refusal
        try:
            self.fn_key, self.fn_form = codec.function(fn)
            self.fn_error: Exception | None = None
        except Exception as exc:
            self.fn_key, self.fn_form, self.fn_error = 0, None, exc

    def ready(self, lot: Lot, budget: int | None = None) -> Iterator[Ready]:
        """The parts of ``lot`` that can go (all of it, or its items one by one when some cannot);
        each item that cannot is reported to ``final`` instead. ``budget``: the codec's
        ``OverBudget`` propagates when the whole lot's payload would pass it (nothing is sent;
        the caller takes fewer items)."""
        start, items = lot.start, lot.items
        if self.fn_error is not None:
            for i in range(len(items)):
                self.final(start + i, "serialization", SerializationError(
                    f"item {self.label(start + i)}: the function {self.fn!r} cannot be pickled: "
                    f"{type(self.fn_error).__name__}: {self.fn_error}", cause=self.fn_error),
                    lot.runs)
            return
        refused = self.refusal(start, len(items)) if self.refusal is not None else None
        if refused is not None:  # a bad cost hint: fail only that item
            yield from self._fail_limit(lot, refused)
            return
        try:
            encoded = self.codec.encode(items, self.arena, budget)
        except OverBudget:
            raise
        except Exception as exc:  # not KeyboardInterrupt: Ctrl-C while pickling stops the batch
            if len(items) == 1:
                self.final(start, "serialization", SerializationError(
                    f"item {self.label(start)}: the argument ({type(items[0]).__module__}."
                    f"{type(items[0]).__qualname__}) cannot be pickled: "
                    f"{type(exc).__name__}: {exc}", cause=exc), lot.runs)
            else:
                yield from self._singly(lot)  # so exactly the items that cannot be encoded fail
            return
        # After the encoding, which may be refused over budget (the items are read again): a
        # callable timeout then runs once per item sent, not once per attempt to encode it.
        timeouts = item_timeouts(self.timeout, items, self.label(start))
        if isinstance(timeouts, Exception):  # a bad limit: fail only that item
            self.codec.release(encoded.payload, None)
            yield from self._fail_limit(lot, timeouts)
            return
        yield Ready(lot, encoded, timeouts)

    def _fail_limit(self, lot: Lot, error: Exception) -> Iterator[Ready]:
        """A lot with an item whose limit or cost hint is bad: that item fails, the rest go."""
        if len(lot.items) == 1:
            self.final(lot.start, "error", error, lot.runs)
        else:
            yield from self._singly(lot)

    def _singly(self, lot: Lot) -> Iterator[Ready]:
        for i, item in enumerate(lot.items):
            yield from self.ready(lot._replace(start=lot.start + i, items=[item]))
