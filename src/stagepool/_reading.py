"""Reading a chunk of items from an iterator within a byte bound.

A chunk is sized by count from the payload per item seen so far; from a generator, reading that
many items is what holds them in memory. Small items ahead of big arrays (2,000 ints, then 4 MiB
segments) sized chunks of thousands, and one read pulled every segment of the stream into the
parent before any was encoded (+4 GB for 1,000 segments). So a read from an iterator stops
before the item whose arrays would pass the bound (the first item is always taken).

Only what an item says of itself cheaply is counted: its ``nbytes`` (numpy arrays, memoryviews
and most array libraries). Arrays nested in other objects are not seen here; the encoder's
payload budget still keeps them out of shared memory (``ChunkSizer.payload_budget``).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Any

__all__ = ["NOTHING", "read_within"]

NOTHING: Any = object()  # read_within's "no item was left over"
_second = operator.itemgetter(1)


def read_within(it: Iterator[Any], size: int, max_bytes: int, into: list[Any]) -> Any:
    """Append up to ``size`` items of ``it`` to ``into`` while their ``nbytes`` add up to at
    most ``max_bytes``; return the item that would have passed it, already read (NOTHING when
    none did). An exception of ``it`` propagates; the items read before it are in ``into``.

    Runs in C (tee, accumulate, takewhile): a Python loop costs ~0.5 us an item, far more than
    a tiny item's whole trip.
    """
    items, probe = itertools.tee(itertools.islice(it, size))
    totals = itertools.accumulate(map(getattr, probe, itertools.repeat("nbytes"),
                                      itertools.repeat(0)))
    # takewhile first: when it stops, zip takes nothing more from items, so the item that passed
    # the bound is still waiting there.
    kept = itertools.takewhile(max_bytes.__ge__, totals)
    into.extend(map(_second, zip(kept, items, strict=False)))  # strict=False: items runs on
    return next(items, NOTHING)
