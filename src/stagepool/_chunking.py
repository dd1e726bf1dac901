"""Chunk planning: how many items go to a worker in one message.

Small chunks balance load and report progress often; big chunks amortise the round trip (about
50-100 us of pickling and pipe hand-offs). ``chunk_size="auto"`` learns the per-item duration from
the chunks that come back and aims each chunk at ``TARGET_CHUNK_SECONDS``:

* while nothing is known about an item's cost it sends single items, so the first outcomes of a
  batch of slow items (0.3 s each) stream one by one instead of arriving in a burst when a blind
  chunk of 8 finishes seconds later; a batch of tiny items learns from its first answer, a few
  hundred microseconds later, having sent at most a window of single items;
* except for a report of known length whose whole payload is small, on a backend that cuts
  chunks (``blind``): after the first item (its encoding gives the payload per item) the rest
  is planned at once, blind, one chunk per worker (``plan_ends``; the first item goes with the
  first chunk when it is small: ``first_joins_plan``), each chunk with a time ``budget``: the
  worker stops a chunk that runs past it between two items and answers with what it ran (a
  slow first item comes back alone). Tiny items thus skip the round
  trip that learns their cost (on a loaded 2-core machine, 1-2 ms of a 5 ms map); when a chunk
  is cut the plan is dropped (``observe_cut``) and the unstarted rest goes out again in chunks
  sized from what was learnt (``rest_size``);
* with an estimate, size = target / per-item time;
* for a batch of known length it never sends more than a ``1 / (TAIL_SHARES x workers)`` share of
  what is left, so chunks shrink near the end and no worker idles at the tail; but a chunk is
  never cut below ``MIN_CHUNK_SECONDS`` of work (the tail of tiny items is not worth a round
  trip);
* once what is left of a known-length batch is little work (``PLAN_SECONDS`` per worker), the
  rest is planned up front, once, as ``multiprocessing.Pool.map`` does blindly: ``TAIL_SHARES``
  shares per worker, the first half of the chunks 1.5 shares each and the last half 0.5 share,
  so the workers end together (``plan_ends``). The batch sends the whole plan at once when its
  payload is small (``planned_chunks``): 20,000 tiny items then travel in 5 single items and 8
  chunks, with one hand-off to the pool thread for all of them, instead of a refill after every
  answer (each costs a GIL hand-off, which on a loaded 2-core machine is up to a millisecond);
* big items travel alone: a chunk holds at most ``CHUNK_BYTES`` of payload (pickle plus shared
  memory; a backend whose round trip costs more sets its own: ``Capabilities.chunk_bytes``), or
  one item. The first chunk of a batch is a single item, so the payload per item is known (from
  its encoding) before a second chunk is cut: a batch of 8 MiB arrays never starts with a 64 MiB
  chunk that one worker must finish before the pipeline flows, and the in-flight window (counted
  in chunks) holds a few arrays instead of dozens;
* that bound is an estimate from the items seen so far, which the next ones may belie (a blind
  plan judges from the first item alone: ``[0]`` then a hundred 8 MiB arrays put 800 MiB into
  ``/dev/shm`` at once). So a chunk of fresh items is encoded within ``OVERRUN_BUDGET`` times
  the bound (``payload_budget``); one that would pass it is taken back unsent, and the payload
  per item is learnt again from the next single item (``observe_overrun``), in chunks of at
  most half as many items as the one taken back (small items learnt again ahead of big ones
  would otherwise size each next chunk to be refused again);
* the payload per item is judged from the last ``PAYLOAD_CHUNKS`` chunks encoded, not the whole
  batch: after twenty 8 MiB arrays, 50,000 tiny items went in 355 chunks (a mean over the
  batch stays near 8 MiB / 20 items for thousands of items); the other way round, big items
  after small ones are what ``payload_budget`` catches.
"""

from __future__ import annotations

import collections
import math
from bisect import bisect_right

__all__ = ["ChunkSizer", "plan_ends"]

# Trade-off: longer chunks cost less overhead per item but make load balancing coarser and
# progress jumpier. 20 ms keeps the per-chunk overhead under ~0.5% for tiny items. A backend whose
# round trip is longer (a cluster's scheduler: ~10-20 ms, not pipelined) asks for more: see
# Capabilities.chunk_seconds, and MIN_CHUNK_SECONDS scales with it.
TARGET_CHUNK_SECONDS = 0.02
# Share of the remaining items one chunk may take: 4 per worker keeps the tail balanced.
TAIL_SHARES = 4
# Below this much work a chunk costs more in round trip than it can save in balance.
MIN_CHUNK_SECONDS = 0.0005
# A known-length batch whose remaining work is at most this per worker is planned up front, once
# (see plan_ends): its chunks then hold at most 1.5 / TAIL_SHARES of it (<= 38 ms of work), and
# instead of shrinking towards single items the last ones are half shares. Generous, because the
# first estimate comes from single items, which measure high (below).
PLAN_SECONDS = 0.1
# Items faster than this are run without a clock read each (their duration is the chunk's mean).
# Two clock reads and a store cost ~0.1 us: 1% of a 10 us item. A lone item measures high (a
# cold call: 1.2-4.4 us for ``x * 2`` here, against 0.15 us in a loop), so a lower bar (2 us)
# sent the chunks after the first answers with per-item clocks on some runs and without on
# others.
TINY_ITEM_SECONDS = 1e-5
# Chunks per worker of a blind plan (see the module docstring): one. Each chunk more is a round
# trip and two hand-offs between this process's threads while the workers wait, and on a loaded
# 2-core machine a hand-off is up to a millisecond; a chunk that turns out long is cut by its
# budget anyway, so the tail stays balanced. 20,000 x (x * 2), paired with multiprocessing.Pool.map
# (300 rounds): 0.82x with two chunks per worker, 0.89x with one.
BLIND_SHARES = 1
# How far past its estimate a chunk sized from a learnt cost may run before it stops between two
# items: loose, so a loaded machine's time slices rarely cut one (a cut costs a resend).
BUDGET_SLACK = 4.0
# Payload one chunk may carry. Moving a few MiB costs milliseconds, far above the ~50-100 us
# round trip a bigger chunk would save, and a smaller chunk lets encoding, work and decoding of
# consecutive items overlap in the parent and the workers.
CHUNK_BYTES = 4 << 20
# How far past CHUNK_BYTES a chunk's real payload may go before it is taken back (see the module
# docstring): loose, so that items of uneven size (segments of 1-3 MiB) are not re-encoded.
OVERRUN_BUDGET = 4
MAX_CHUNK = 1 << 16
# The payload per item is the mean of this many last chunks encoded (see the module docstring).
PAYLOAD_CHUNKS = 4
# A first item encoded this small goes with the blind plan's first chunk (first_joins_plan).
FIRST_JOINS_BYTES = 64 << 10
# An input of unknown length is usually a stream: its chunks stay small enough that the items
# held in flight (max_in_flight chunks of them) cost megabytes, not hundreds.
MAX_STREAM_CHUNK = 4096


class ChunkSizer:
    """Decides the size of the next chunk of one batch. Not thread-safe: one per batch."""

    def __init__(self, fixed: int | None, workers: int, total: int | None,
                 target: float = TARGET_CHUNK_SECONDS, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.fixed = fixed
        self.target = target
        self.chunk_bytes = chunk_bytes  # the payload bound (Capabilities.chunk_bytes)
        self.min_seconds = MIN_CHUNK_SECONDS * target / TARGET_CHUNK_SECONDS
        self.plan_seconds = PLAN_SECONDS * target / TARGET_CHUNK_SECONDS
        self.workers = max(1, workers)
        self.total = total
        self._items = 0
        self._busy = 0.0
        # Items and payload bytes of the last PAYLOAD_CHUNKS chunks encoded, and their sums.
        self._payloads: collections.deque[tuple[int, int]] = collections.deque()
        self._encoded_items = 0
        self._payload = 0
        self._plan: list[int] | None = None  # a known-length batch's last chunks: their ends
        # May the rest be planned before any cost is known (see the module docstring)? Set by the
        # batch: a report of known length, on a backend that cuts chunks.
        self.blind = False
        self._blind_plan = False  # the plan was made blind and no chunk of it was cut yet
        self._overrun_cap = MAX_CHUNK  # at most this many items a chunk (see observe_overrun)

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
        self._payloads.append((n_items, payload_bytes))
        self._encoded_items += n_items
        self._payload += payload_bytes
        if len(self._payloads) > PAYLOAD_CHUNKS:
            old_items, old_bytes = self._payloads.popleft()
            self._encoded_items -= old_items
            self._payload -= old_bytes

    def next_size(self, submitted: int) -> int:
        """Size of the next chunk, given how many items of the batch were already submitted."""
        if self.fixed is not None:
            return self.fixed
        if not self._encoded_items:
            return 1  # learn the payload per item first (see the module docstring)
        per_item = self.per_item
        if per_item is None:
            # The cost is unknown: a slow item must not hold others back (a blind plan's
            # chunks are cut by their budget instead).
            return self._blind_size(submitted)
        size = int(self.target / max(per_item, 1e-9))
        if self.total is not None:
            remaining = max(1, self.total - submitted)
            planned = self._planned(submitted, remaining, per_item)
            if planned:
                size = planned
            else:
                tail = math.ceil(remaining / (TAIL_SHARES * self.workers))
                size = min(size, max(tail, int(self.min_seconds / max(per_item, 1e-9))))
        else:
            size = min(size, MAX_STREAM_CHUNK)
        size = min(size, self.chunk_bytes * self._encoded_items // max(1, self._payload))
        return max(1, min(size, self._overrun_cap))

    def _planned(self, submitted: int, remaining: int, per_item: float) -> int:
        """The size of the next planned chunk (0: no plan yet, the rest is still much work)."""
        if self._plan is None:
            if remaining * per_item > self.plan_seconds * self.workers:
                return 0
            self._plan = plan_ends(submitted, remaining, self.workers,
                                   int(remaining * per_item / self.min_seconds))
        at = bisect_right(self._plan, submitted)
        return self._plan[at] - submitted if at < len(self._plan) else remaining

    def _blind_size(self, submitted: int) -> int:
        """The next chunk of a blind plan, made now if it may be; else 1."""
        if self._plan is None:
            if not self.blind or self.total is None or self.total <= submitted:
                return 1
            remaining = self.total - submitted
            if remaining * self._payload > self.chunk_bytes * self._encoded_items:
                return 1  # too much to encode at once: learn the cost first
            self._plan = plan_ends(submitted, remaining, self.workers, BLIND_SHARES * self.workers)
            self._blind_plan = True
        at = bisect_right(self._plan, submitted)
        return self._plan[at] - submitted if at < len(self._plan) else 1

    def first_joins_plan(self, first_bytes: int) -> bool:
        """Whether the batch's first item, sent alone to learn the payload per item, should go
        with the first chunk of the blind plan just made instead (``Batch._take``): when its
        encoding is ``first_bytes`` long and holds all of its payload (nothing went to shared
        memory), re-encoding it costs less than the lone chunk: a round trip, and a worker that
        waits behind it for its planned chunk."""
        return (self._blind_plan and self._encoded_items == 1
                and self._payload <= first_bytes <= FIRST_JOINS_BYTES)

    def budget(self, size: int, start: int = -1) -> float | None:
        """The time budget of the next chunk (``size`` items from position ``start``): the
        target while it is part of a blind plan (see the module docstring); once a cost is
        learnt, ``BUDGET_SLACK`` times the chunk's estimate (at least the target), since the
        first items' cost says nothing of later ones (tiny first, 0.3 s later: one worker
        would run them all, their outcomes in one burst); None for a ``chunk_size`` the user
        fixed, or while nothing is known."""
        if self.fixed is not None:
            return None
        expected = self.expected_seconds(size, start)
        if expected is None:
            return self.target if self._blind_plan else None
        return max(self.target, BUDGET_SLACK * expected)

    def payload_budget(self, size: int) -> int | None:
        """The most bytes a chunk of ``size`` fresh items may encode to (None: no bound: a
        single item, or a ``chunk_size`` the user fixed)."""
        if self.fixed is not None or size <= 1:
            return None
        return OVERRUN_BUDGET * self.chunk_bytes

    def read_bytes(self, size: int) -> int | None:
        """How many bytes of arrays a chunk of ``size`` fresh items may be read with from an
        iterator (see ``_reading``; None: no bound, as for ``payload_budget``)."""
        return None if self.payload_budget(size) is None else self.chunk_bytes

    def observe_overrun(self, size: int) -> None:
        """A chunk of ``size`` items would have passed ``payload_budget``: the payload per item
        was misjudged. It is learnt again from the next single item; a plan made from it is
        dropped, and no blind plan is made again (one item's payload says too little of this
        batch's). Chunks hold at most half as many items from now on: small items learnt again
        (one by one, ahead of big ones) would size the next chunk as big as this one, to be
        refused again, and each refusal re-encodes up to the budget (2,000 small items then
        arrays: a refusal per small item); halving ends that after a few refusals."""
        self._payloads.clear()
        self._encoded_items = self._payload = 0
        self._plan, self._blind_plan, self.blind = None, False, False
        self._overrun_cap = max(1, min(self._overrun_cap, size) // 2)

    def observe_cut(self) -> None:
        """A chunk came back cut short by its budget: its items are not tiny after all. The
        blind plan's chunks already sent are cut the same way; the rest is sized as usual."""
        if self._blind_plan:
            self._plan, self._blind_plan = None, False

    def rest_size(self, n: int) -> int:
        """How many unstarted items of the cut chunks (``n`` of them left) go out together:
        about ``target`` seconds, at most a tail share of ``n``, never below
        ``MIN_CHUNK_SECONDS``."""
        per_item = max(self.per_item or 0.0, 1e-9)
        size = min(int(self.target / per_item),
                   max(math.ceil(n / (TAIL_SHARES * self.workers)),
                       int(self.min_seconds / per_item)))
        size = min(size, self.chunk_bytes * self._encoded_items // max(1, self._payload))
        return max(1, min(size, self._overrun_cap, n))

    def planned_chunks(self, submitted: int) -> int:
        """How many chunks of the plan are still to go, when they may all go at once (their
        payload is at most ``chunk_bytes`` together); else 0."""
        plan = self._plan
        if plan is None or not self._encoded_items:
            return 0
        payload = (plan[-1] - submitted) * self._payload // self._encoded_items
        return len(plan) - bisect_right(plan, submitted) if payload <= self.chunk_bytes else 0

    def in_flight_limit(self, window: int, in_flight: int, submitted: int) -> int:
        """How many chunks may be in flight: one per worker while the items' cost is unknown
        (all that can run; for tiny items each one more is a round trip before the planned rest
        can go), then the ``window``, or the whole rest of a plan whose payload is small (one
        hand-off to the backend for all of it, instead of a refill per answer)."""
        if self.per_item is None and self.fixed is None and not self._blind_plan:
            return min(window, self.workers)
        return max(window, in_flight + self.planned_chunks(submitted))

    def per_item_clock(self) -> bool:
        """Whether items are slow enough to be worth two clock reads each (see run_chunk)."""
        per_item = self.per_item
        if per_item is None:  # a blind plan's chunks run the tiny loop: their budget needs it
            return not self._blind_plan
        return per_item > TINY_ITEM_SECONDS

    def expected_seconds(self, size: int, start: int = -1) -> float | None:
        """Estimated duration of a chunk of ``size`` items from position ``start`` (None while
        nothing is known)."""
        per_item = self.per_item
        return None if per_item is None else per_item * size


def plan_ends(start: int, n: int, workers: int, worth: int) -> list[int]:
    """The ends of the chunks that carry items ``start`` to ``start + n - 1``: ``TAIL_SHARES``
    shares per worker, the first half of the chunks 1.5 shares each and the last half 0.5, so a
    worker that started late or ran slow catches up on the small ones. ``worth``: how many
    chunks the work is worth (a chunk under ``MIN_CHUNK_SECONDS`` is not worth its round trip);
    fewer than the shares means that many equal chunks instead."""
    shares = TAIL_SHARES * workers
    chunks = max(1, min(shares, worth, n))
    if chunks < shares:
        fractions = [1.0] * chunks
    else:
        half = shares // 2
        fractions = [1.5] * half + [0.5] * (shares - half)
    ends: list[int] = []
    done, total = 0.0, sum(fractions)
    for fraction in fractions:
        done += fraction
        end = start + round(n * done / total)
        if not ends or end > ends[-1]:
            ends.append(end)
    ends[-1] = start + n
    return ends
