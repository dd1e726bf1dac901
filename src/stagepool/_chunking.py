"""Chunk planning: how many items go to a worker in one message.

Small chunks balance load and report progress often; big chunks amortise the round trip (about
50-100 us of pickling and pipe hand-offs). ``chunk_size="auto"`` learns the per-item duration from
the chunks that come back and aims each chunk at ``TARGET_CHUNK_SECONDS``:

* while nothing is known about an item's cost it sends single items, so the first outcomes of a
  batch of slow items (0.3 s each) stream one by one instead of arriving in a burst when a blind
  chunk of 8 finishes seconds later; a batch of tiny items learns from its first answer, a few
  hundred microseconds later, having sent at most a window of single items;
* with an estimate, size = target / per-item time;
* for a batch of known length it never sends more than a ``1 / (TAIL_SHARES x workers)`` share of
  what is left, so chunks shrink near the end and no worker idles at the tail; but a chunk is
  never cut below ``MIN_CHUNK_SECONDS`` of work (the tail of tiny items is not worth a round
  trip) nor above an even split of the rest between the workers;
* big items travel alone: a chunk holds at most ``CHUNK_BYTES`` of payload (pickle plus shared
  memory), or one item. The first chunk of a batch is a single item, so the payload per item is
  known (from its encoding) before a second chunk is cut: a batch of 8 MiB arrays never starts with
  a 64 MiB chunk that one worker must finish before the pipeline flows, and the in-flight window
  (counted in chunks) holds a few arrays instead of dozens.
"""

from __future__ import annotations

import math

__all__ = ["ChunkSizer"]

# Trade-off: longer chunks cost less overhead per item but make load balancing coarser and
# progress jumpier. 20 ms keeps the per-chunk overhead under ~0.5% for tiny items. A backend whose
# round trip is longer (a cluster's scheduler: ~10-20 ms, not pipelined) asks for more: see
# Capabilities.chunk_seconds, and MIN_CHUNK_SECONDS scales with it.
TARGET_CHUNK_SECONDS = 0.02
# Share of the remaining items one chunk may take: 4 per worker keeps the tail balanced.
TAIL_SHARES = 4
# Below this much work a chunk costs more in round trip than it can save in balance.
MIN_CHUNK_SECONDS = 0.0005
# Items faster than this are run without a clock read each (their duration is the chunk's mean).
TINY_ITEM_SECONDS = 2e-6
# Payload one chunk may carry. Moving a few MiB costs milliseconds, far above the ~50-100 us
# round trip a bigger chunk would save, and a smaller chunk lets encoding, work and decoding of
# consecutive items overlap in the parent and the workers.
CHUNK_BYTES = 4 << 20
MAX_CHUNK = 1 << 16
# An input of unknown length is usually a stream: its chunks stay small enough that the items
# held in flight (max_in_flight chunks of them) cost megabytes, not hundreds.
MAX_STREAM_CHUNK = 4096


class ChunkSizer:
    """Decides the size of the next chunk of one batch. Not thread-safe: one per batch."""

    def __init__(self, fixed: int | None, workers: int, total: int | None,
                 target: float = TARGET_CHUNK_SECONDS) -> None:
        self.fixed = fixed
        self.target = target
        self.min_seconds = MIN_CHUNK_SECONDS * target / TARGET_CHUNK_SECONDS
        self.workers = max(1, workers)
        self.total = total
        self._items = 0
        self._busy = 0.0
        self._encoded_items = 0
        self._payload = 0

    @property
    def per_item(self) -> float | None:
        """Mean seconds per item measured so far, or None before any chunk came back."""
        return self._busy / self._items if self._items else None

    def observe(self, n_items: int, busy_seconds: float) -> None:
        """Feed back a finished chunk: how many items it ran and how long they took together."""
        self._items += n_items
        self._busy += busy_seconds

    def observe_payload(self, n_items: int, payload_bytes: int) -> None:
        """Feed back an encoded chunk: how many items it holds and how many bytes they take."""
        self._encoded_items += n_items
        self._payload += payload_bytes

    def next_size(self, submitted: int) -> int:
        """Size of the next chunk, given how many items of the batch were already submitted."""
        if self.fixed is not None:
            return self.fixed
        if not self._encoded_items:
            return 1  # learn the payload per item first (see the module docstring)
        per_item = self.per_item
        if per_item is None:
            return 1  # the cost is unknown: a slow item must not hold others back
        size = int(self.target / max(per_item, 1e-9))
        if self.total is not None:
            remaining = max(1, self.total - submitted)
            tail = math.ceil(remaining / (TAIL_SHARES * self.workers))
            if per_item is not None:
                tail = max(tail, int(self.min_seconds / max(per_item, 1e-9)))
            size = min(size, tail)
        else:
            size = min(size, MAX_STREAM_CHUNK)
        size = min(size, CHUNK_BYTES * self._encoded_items // max(1, self._payload))
        return max(1, min(size, MAX_CHUNK))

    def per_item_clock(self) -> bool:
        """Whether items are slow enough to be worth two clock reads each (see run_chunk)."""
        per_item = self.per_item
        return per_item is None or per_item > TINY_ITEM_SECONDS

    def expected_seconds(self, size: int) -> float | None:
        """Estimated duration of a chunk of ``size`` items (None while nothing is known)."""
        per_item = self.per_item
        return None if per_item is None else per_item * size
