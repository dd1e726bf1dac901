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
  trip);
* once what is left of a known-length batch is little work (``SPLIT_SECONDS`` per worker), it is
  split once into ``SPLIT_SHARES`` equal chunks per worker: 20,000 tiny items then travel in about
  nine chunks instead of 25 ever smaller ones (each chunk costs the parent ~0.2 ms of CPU, which
  on a small machine the workers wait for), and the last chunks finish together;
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
# A known-length batch whose remaining work is at most this per worker is split evenly, once,
# into SPLIT_SHARES chunks per worker. The last chunks then differ by at most one chunk of work
# (<= SPLIT_SECONDS / SPLIT_SHARES: 5 ms) instead of shrinking to single items.
SPLIT_SECONDS = 0.01
SPLIT_SHARES = 2
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
        self._split: int | None = None  # the even split of a known-length batch's last work

    @property
    def per_item(self) -> float | None:
        """Mean seconds per item measured so far, or None before any chunk came back."""
        return self._busy / self._items if self._items else None

    def observe(self, n_items: int, busy_seconds: float, start: int = -1) -> None:
        """Feed back a finished chunk: how many items it ran and how long they took together
        (``start``, its first position, matters to a sizer by cost: see _costs.CostSizer)."""
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
                tail = max(tail, int(self.min_seconds / max(per_item, 1e-9)), self._even_split(
                    remaining, per_item))
            size = min(size, tail)
        else:
            size = min(size, MAX_STREAM_CHUNK)
        size = min(size, CHUNK_BYTES * self._encoded_items // max(1, self._payload))
        return max(1, min(size, MAX_CHUNK))

    def _even_split(self, remaining: int, per_item: float) -> int:
        """The size of the last chunks once little work is left (0 until then)."""
        if self._split is None and remaining * per_item <= SPLIT_SECONDS * self.workers:
            self._split = math.ceil(remaining / (SPLIT_SHARES * self.workers))
        return self._split or 0

    def per_item_clock(self) -> bool:
        """Whether items are slow enough to be worth two clock reads each (see run_chunk)."""
        per_item = self.per_item
        return per_item is None or per_item > TINY_ITEM_SECONDS

    def expected_seconds(self, size: int, start: int = -1) -> float | None:
        """Estimated duration of a chunk of ``size`` items from position ``start`` (None while
        nothing is known)."""
        per_item = self.per_item
        return None if per_item is None else per_item * size
