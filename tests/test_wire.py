"""A lane's task message on its own: what the pool thread writes is what the worker reads."""

from __future__ import annotations

import pytest

from stagepool._wire import INLINE_ITEMS, TaskHeader, pack_task, unpack_task


@pytest.mark.parametrize("fn_blob", [None, b"pickled function"])
@pytest.mark.parametrize(("timed", "clock"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("budget", [0.0, 0.02])
def test_a_small_task_is_one_message(fn_blob: bytes | None, timed: bool, clock: bool,
                                     budget: float) -> None:
    header = TaskHeader(7, 3, fn_blob, 12, timed, clock, budget)
    message, rest = pack_task(header, b"items" * 10)
    assert rest is None
    read, items = unpack_task(message)
    assert read == header
    assert items is not None and bytes(items) == b"items" * 10


def test_big_items_follow_as_their_own_message_without_a_copy() -> None:
    big = b"x" * (INLINE_ITEMS + 1)
    message, rest = pack_task(TaskHeader(1, 1, b"fn", 1, False, True), big)
    assert rest is big
    read, items = unpack_task(message)
    assert items is None and read.fn_blob == b"fn"
