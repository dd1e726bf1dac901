"""The payload bound of an automatic chunk is the backend's (``Capabilities.chunk_bytes``): 4 MiB
locally, where a round trip costs ~0.1 ms; more on dask, where each chunk costs ~18 ms of dask's
machinery and a 4 MiB array per chunk ran at half client.map's speed."""

from __future__ import annotations

import pytest

from stagepool._backends._protocol import Capabilities
from stagepool._chunking import CHUNK_BYTES, ChunkSizer
from stagepool._costs import CostSizer, arrange, cost_hints, make_sizer

MIB = 1 << 20


def _sized(sizer: ChunkSizer) -> int:
    """The second chunk's size after one 4 MiB item that took 1 ms."""
    sizer.observe_payload(1, 4 * MIB + 200)
    sizer.observe(1, 0.001)
    return sizer.next_size(1)


def test_the_local_bound_is_unchanged() -> None:
    assert Capabilities(exact_blame=True, survives_crash=True, hard_timeouts=True,
                        kills_running=True, shared_memory=True, memory_limits=True,
                        processes=True, serializes=True).chunk_bytes == CHUNK_BYTES == 4 * MIB
    assert _sized(ChunkSizer(None, workers=2, total=64)) == 1  # each 4 MiB item alone


def test_a_bigger_bound_carries_several_big_items() -> None:
    sizer = make_sizer(None, 2, 64, 0.5, None, chunk_bytes=64 * MIB)
    assert 1 < _sized(sizer) < 16  # a tail share of 63 items, under 64 MiB


def test_a_sizer_by_cost_takes_the_bound_too() -> None:
    hints = cost_hints(cost=lambda _item: 1.0, size=None, unit=None, lookahead=None, stream=False)
    sizer = make_sizer(None, 2, 64, 0.5, arrange(hints, list(range(64)), 64, 2),
                       chunk_bytes=64 * MIB)
    assert isinstance(sizer, CostSizer) and sizer.chunk_bytes == 64 * MIB


def test_the_dask_backend_declares_a_bigger_bound() -> None:
    pytest.importorskip("distributed")
    from stagepool._backends._dask import CAPABILITIES

    assert CAPABILITIES.chunk_bytes == 64 * MIB
