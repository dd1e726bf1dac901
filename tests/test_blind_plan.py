"""The blind plan's two costs (issue 15): the order in which a cut chunk's rest goes out, and a
block of the budgeted tiny loop that turns slow."""

from __future__ import annotations

import os
from array import array

from stagepool._answers import Answers, BatchPolicy, Lot
from stagepool._backends._serial import InProcessCodec
from stagepool._chunking import ChunkSizer
from stagepool._worker import ChunkResult


def _cut_answer(lot: Lot, ran: int, seconds: float) -> ChunkResult:
    """The answer of ``lot`` cut by its budget after ``ran`` items of ``seconds`` each."""
    stamps = array("d", [0.0, ran * seconds])
    return ChunkResult(list(lot.items[:ran]), stamps, None, os.getpid())


def test_the_rests_of_cut_chunks_go_out_in_input_order() -> None:
    """A blind plan's chunks of slow items are each cut after an item or two, in the order the
    workers reach them; their rests went out last cut first, so 200 uneven items ran the first
    chunk's rest last and ended 36 ms apart on two workers (14 in input order): 1-2% of the
    batch. The rests go out in input order, whatever order the cuts came in."""
    sizer = ChunkSizer(None, workers=2, total=200)
    sizer.blind = True
    answers = Answers(InProcessCodec(), sizer, BatchPolicy(), None)
    chunks = [Lot(start, list(range(start, start + 50)), 1, 0) for start in (0, 50, 100, 150)]
    for lot in (chunks[0], chunks[2], chunks[1], chunks[3]):  # as two workers cut them
        answers.absorb(lot, _cut_answer(lot, 2, 0.02))
    resent: list[int] = []
    while answers.again:
        lot = answers.next_again(1 << 30)
        assert lot is not None and lot.items == list(range(lot.start, lot.start + len(lot.items)))
        resent += lot.items
    assert resent == [i for i in range(200) if i % 50 > 1]
