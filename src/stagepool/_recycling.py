"""Which answered input segments a batch keeps, to reuse their pages: the bookkeeping behind
``_shm``'s recycling (names by size, per batch), without any file; ``_shm`` creates, stats and
unlinks the segments.

Filling fresh tmpfs pages costs about three times more than rewriting pages a file already has
(measured 3.1 vs 0.9 ms for 8 MiB), and a media batch sends arrays of a few sizes over and
over. So the parent keeps a batch's input segments once their chunk is answered and no worker
still maps them (a worker that keeps an input array unlinks its file: ``_shm.release_inputs``),
in the batch's *arena*, for its next arrays of the same size. An arena holds at most
RECYCLE_BYTES, and closing it (the batch ends) hands back what it kept, to be unlinked, so
nothing outlives the batch. Only sizes the batch has asked for at least twice are kept: arrays
of uneven sizes are never reused, and kept up to the bound they held 211 MiB of /dev/shm to no
end (against ~100 MiB of in-flight window).

Thread-safe; imports nothing of the package.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["RECYCLE_BYTES", "close", "keep", "kept_bytes", "open", "open_arenas", "take"]

RECYCLE_BYTES = 256 * 1024 * 1024


class _Arena:
    __slots__ = ("asked", "free", "kept")

    def __init__(self) -> None:
        self.free: dict[int, list[str]] = {}  # size in bytes -> names kept for reuse
        self.kept = 0  # their bytes
        self.asked: collections.Counter[int] = collections.Counter()  # sizes asked, not found


_arenas: dict[int, _Arena] = {}
# Re-entrant: close() runs from generator finalizers, which the garbage collector may start
# inside keep() or take() in the same thread.
_lock = threading.RLock()


def open(arena: int) -> None:
    """Start keeping input segments for one batch."""
    with _lock:
        _arenas.setdefault(arena, _Arena())


def close(arena: int) -> list[str]:
    """The batch is over: the names its arena kept (the caller unlinks them). Later ``keep``
    calls for it return False."""
    with _lock:
        gone = _arenas.pop(arena, None)
    return [] if gone is None else [name for names in gone.free.values() for name in names]


def keep(arena: int | None, name: str, size: int) -> bool:
    """Keep the answered segment ``name`` (``size`` bytes) for reuse, if the arena is open, has
    room and has asked for that size twice; False: the caller unlinks it."""
    with _lock:
        kept = _arenas.get(arena) if arena is not None else None
        if kept is None or kept.kept + size > RECYCLE_BYTES or kept.asked[size] < 2:
            return False
        kept.free.setdefault(size, []).append(name)
        kept.kept += size
        return True


def take(arena: int, nbytes: int) -> str | None:
    """A kept segment of ``nbytes`` for the arena's next array, if there is one (the miss is
    counted: see ``keep``)."""
    with _lock:
        kept = _arenas.get(arena)
        if kept is None:
            return None
        names = kept.free.get(nbytes)
        if not names:
            kept.asked[nbytes] += 1
            return None
        kept.kept -= nbytes
        return names.pop()


def kept_bytes(arena: int) -> int | None:
    """The bytes the arena keeps now (None: not open)."""
    with _lock:
        kept = _arenas.get(arena)
        return None if kept is None else kept.kept


def open_arenas() -> list[int]:
    """The arenas open now (at exit, those a batch left open are closed)."""
    with _lock:
        return list(_arenas)
