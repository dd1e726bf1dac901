"""Task functions and the child script of the resume tests (module-level: workers import them).

Every run of :func:`marked` leaves a marker file ``<item index>.<uuid>`` in the item's marker
directory, so a test counts the real runs of each item across processes and restarts.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import numpy as np

Item = tuple[int, str, float]  # (index, marker directory, seconds to sleep)


def marked(item: Item) -> Any:
    """Mark the run, sleep, and return the square (a 2.4 MB array for every 7th item, so side
    files are exercised); item 5 raises."""
    index, markers, seconds = item
    with open(os.path.join(markers, f"{index}.{uuid.uuid4().hex}"), "x"):
        pass
    time.sleep(seconds)
    if index == 5:
        raise ValueError(f"item {index} is bad")
    if index % 7 == 0:
        return np.full(300_000, index, dtype=np.float64)
    return index * index


def other(item: Item) -> Any:
    return marked(item)


def item_key(item: Item) -> str:
    return f"segment-{item[0]}"


def runs(markers: str) -> dict[int, int]:
    """How many times each item ran, from the marker files."""
    counts: dict[int, int] = {}
    for name in os.listdir(markers):
        index = int(name.split(".")[0])
        counts[index] = counts.get(index, 0) + 1
    return counts


def items(n: int, markers: str, seconds: float) -> list[Item]:
    return [(i, markers, seconds) for i in range(n)]


if __name__ == "__main__":  # the child a resume test kills: a checkpointed batch, then "done"
    import _resume_tasks as tasks  # not __main__'s: the checkpoint names the function's module
    import stagepool as sp

    checkpoint, markers, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    with sp.Engine(workers=2, chunk_size=1, max_in_flight=2) as engine:
        engine.map(tasks.item_key, [(0, "", 0.0)] * 4)  # every worker started and warm
        print("started", flush=True)
        engine.map(tasks.marked, items(n, markers, seconds), checkpoint=checkpoint,
                   key=tasks.item_key)
    print("done", flush=True)
