"""The batch's answer slot on its own: the taker wakes at the first answer and takes all that
are there; every wait is bounded."""

from __future__ import annotations

import threading
import time

from stagepool._mailslot import Mailslot


def test_a_taker_wakes_at_the_first_item_not_at_its_timeout() -> None:
    slot: Mailslot[int] = Mailslot()

    def put_later() -> None:
        time.sleep(0.05)
        slot.put(1)

    thread = threading.Thread(target=put_later)
    thread.start()
    started = time.monotonic()
    assert slot.take(10.0) == [1]
    assert time.monotonic() - started < 5
    thread.join(10)


def test_a_take_returns_every_item_there_in_order() -> None:
    slot: Mailslot[int] = Mailslot()
    for item in (1, 2, 3):
        slot.put(item)
    assert slot.take(10.0) == [1, 2, 3]
    assert slot.take(0.0) == []


def test_a_wait_is_bounded() -> None:
    slot: Mailslot[int] = Mailslot()
    started = time.monotonic()
    assert slot.take(0.05) == []
    assert 0.04 < time.monotonic() - started < 5
