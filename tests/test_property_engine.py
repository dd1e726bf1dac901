"""A property of the engine on real workers: any mix of item counts, chunk sizes, raising items
and calling styles gives exactly one outcome per item, in order where promised, with the right
value or the right error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _tasks
import stagepool as sp

CALLS = ("map", "imap ordered", "imap unordered")


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[tuple[int, bool]], bool]:
    """Items for ``_tasks.fail_on`` (some raising), as a list or a one-shot iterator."""
    n = draw(st.integers(0, 300))
    failing = draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n))
    return [(i, i in failing) for i in range(n)], draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches(), chunk_size=st.one_of(st.just("auto"), st.integers(1, 64)),
       call=st.sampled_from(CALLS))
def test_one_true_outcome_per_item(engine: sp.Engine, batch: tuple[list[tuple[int, bool]], bool],
                                   chunk_size: int | str, call: str) -> None:
    flags, as_iterator = batch
    items: Any = iter(flags) if as_iterator else flags
    if call == "map":
        outcomes = list(engine.map(_tasks.fail_on, items, chunk_size=chunk_size))
    else:
        outcomes = list(engine.imap(_tasks.fail_on, items, chunk_size=chunk_size,
                                    ordered=call == "imap ordered"))
    indices = [o.index for o in outcomes]
    assert sorted(indices) == list(range(len(flags)))  # each item once: none lost, none twice
    if call != "imap unordered":
        assert indices == list(range(len(flags)))
    for outcome in outcomes:
        i = outcome.index
        assert outcome.attempts == 1
        if flags[i][1]:
            assert outcome.kind == "error" and not outcome.ok and outcome.value is None
            assert type(outcome.error) is ValueError and str(outcome.error) == f"bad item {i}"
            with pytest.raises(ValueError, match=f"bad item {i}$"):
                outcome.unwrap()
        else:
            assert outcome.kind == "ok" and outcome.error is None and outcome.value == 3 * i
