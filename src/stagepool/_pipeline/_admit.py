"""The order segments enter a pipeline: as given, or longest-first with ``cost=``.

    items --(no cost=)--------------------------------------> (index, item, None) in input order
    items --cost=--> _costs.Arrangement (the batch's own: whole known-length input sorted
            longest-first; an input of unknown length in blocks of ``lookahead``)
                                 --> (input index, item, refusal) in dispatch order

A segment whose cost (or size) could not be measured comes first with its ``refusal`` (the
error that names the item), and never runs: the flow gives it its outcome at once. The segments'
indices stay their input indices, so the report is in input order whatever the dispatch order.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

from .._costs import CostHints, arrange

__all__ = ["admission"]


def admission(hints: CostHints | None, items: Iterable[Any], total: int | None,
              workers: int) -> Generator[tuple[int, Any, Exception | None], None, None]:
    """``(input index, item, refusal)`` in the order to admit them; the items iterable's own
    failure propagates after the items it gave (and, with ``cost=``, after their block)."""
    arrangement = arrange(hints, items, total, workers)
    if arrangement is None:
        for index, item in enumerate(items):
            yield index, item, None
        return
    for position, item in enumerate(arrangement):
        yield arrangement.label(position), item, arrangement.refusal(position, 1)
