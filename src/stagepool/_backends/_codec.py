"""The pickling codec: cloudpickle, with big numpy arrays moved through shared memory.

The local backend uses it as is; the dask backend with ``threshold`` 0 (nothing in shared memory:
its workers may be on other machines) and its own wrapping for dask's transport.

Functions are pickled once and keyed by their pickle, so a worker unpickles each function once
(it caches them by key). Items are pickled by the submitting thread; arrays of ``threshold``
bytes and more go to ``/dev/shm`` segments that the batch's arena recycles between chunks (see
``_transport``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from typing import Any, cast

from .. import _shm, _transport
from .._transport import OverBudget
from .._worker import decoded_result, dumps
from ._plain import MAX_LENGTH, PlainPickler
from ._protocol import Encoded

__all__ = ["SharedMemoryCodec"]

# Functions remembered by their pickle; past this many the table starts afresh (the workers'
# own caches are smaller still, see _worker.FN_CACHE_SIZE).
MAX_FUNCTIONS = 256


class SharedMemoryCodec:
    """Pickles with big arrays in shared memory (``threshold`` 0: plain pickles only).

    With ``read_only_inputs`` (the default: the engine's ``writable_inputs=False``) every input
    array arrives read-only, whatever its size: big ones are views of shared memory, and a
    function that changes its input in place must fail on a 2 s test segment as it would on
    a 3 s one, not only past the threshold."""

    def __init__(self, threshold: int, *, read_only_inputs: bool = True) -> None:
        self.threshold = threshold
        self.read_only_inputs = read_only_inputs
        self._keys: dict[bytes, int] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._plain = PlainPickler()

    def function(self, fn: Callable[..., Any]) -> tuple[int, bytes]:
        blob = self._plain.function(fn) or dumps(fn)
        with self._lock:
            key = self._keys.get(blob)
            if key is None:
                if len(self._keys) >= MAX_FUNCTIONS:
                    self._keys.clear()
                key = self._keys[blob] = next(self._counter)
        return key, blob

    def encode(self, items: list[Any], arena: int | None, budget: int | None = None) -> Encoded:
        if len(items) <= MAX_LENGTH:  # a call or a few items: the C pickler where it writes the
            # same bytes (cloudpickle's set-up alone costs ~6 us)
            plain = self._plain.dumps(items)
            if plain is not None:
                if budget is not None and len(plain) > budget:
                    raise OverBudget(budget)
                return Encoded(plain, len(plain))
        blob, nbytes = _transport.dumps_sized(items, threshold=self.threshold, owner=os.getpid(),
                                              creator="p", arena=arena,
                                              read_only=self.read_only_inputs, budget=budget)
        return Encoded(blob, nbytes)

    def keep(self, encoded: Encoded, items: list[Any]) -> list[Any]:
        """The chunk's items again, their big arrays as lazy read-only views of the segments just
        written: the batch keeps what it may send again (a crash's innocents, a retry) without
        holding every input twice (segment + the caller's array, which can now be freed). The
        views stay valid even when a worker unlinks a segment it keeps."""
        if encoded.nbytes <= len(encoded.payload):  # no array went to shared memory
            return items
        try:
            return cast(list[Any], _transport.loads(encoded.payload, unlink=False, lazy=True))
        except Exception:  # out of address space, say: keep the originals instead
            return items

    def decode(self, result: bytes | memoryview) -> Any:
        return decoded_result(_transport.loads(result, writable=True, unlink=True))

    def release(self, items: bytes, arena: int | None) -> None:
        if arena is None:
            _shm.discard(items)
        else:
            _shm.recycle(items, arena)

    def drop(self, result: Any) -> None:
        if isinstance(result, bytes):
            _shm.discard(result)

    def open_arena(self, arena: int) -> None:
        _shm.open_arena(arena)

    def close_arena(self, arena: int) -> None:
        _shm.close_arena(arena)
