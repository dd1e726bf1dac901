"""The batch's answer slot on its own: a taker that asks for all its answers sleeps until they
are there, unless one is urgent; every wait is bounded."""

from __future__ import annotations

import threading
import time

from stagepool._mailslot import Mailslot


def _put_later(slot: Mailslot[int], items: list[int], *, urgent: bool = False,
               delay: float = 0.05) -> threading.Thread:
    def put() -> None:
        for item in items:
            time.sleep(delay)
            slot.put(item, urgent=urgent)

    thread = threading.Thread(target=put)
    thread.start()
    return thread


def test_a_taker_that_wants_three_sleeps_until_the_third() -> None:
    slot: Mailslot[int] = Mailslot()
    thread = _put_later(slot, [1, 2, 3])
    assert slot.take(10.0, wanted=3) == [1, 2, 3]
    thread.join(10)


def test_an_urgent_item_ends_the_wait_at_once() -> None:
    slot: Mailslot[int] = Mailslot()
    slot.put(1)
    thread = _put_later(slot, [2], urgent=True)
    started = time.monotonic()
    assert slot.take(10.0, wanted=5) == [1, 2]
    assert time.monotonic() - started < 5
    thread.join(10)


def test_a_wait_is_bounded_and_keeps_nothing_back() -> None:
    slot: Mailslot[int] = Mailslot()
    slot.put(7)
    assert slot.take(0.05, wanted=2) == [7]  # the timeout: what is there
    assert slot.take(0.0) == []
    slot.put(8)
    assert slot.take(0.0) == [8]  # wanted=1 by default: no wait
