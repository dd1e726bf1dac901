"""Big numpy arrays as dask frames: a chunk's (or an answer's) arrays travel beside its pickle as
``uint8`` views, which dask sends as out-of-band buffers straight from their memory (no copy into
a message), and the dask worker hands them to its lanes through shared memory, not a pipe.

    client: encode(items)       the pickle, each array of FRAME_BYTES and more replaced by a
                                reference (``_transport``'s, as for a segment) + the arrays'
                                bytes, uncopied (``Frames``)
    dask worker: to_blob        each frame copied once into a /dev/shm segment of the worker's
                                host, the pickle behind a header naming them: a ``_transport``
                                blob the lanes map without a copy (read-only, or copy-on-write
                                with writable_inputs)
    lane: results of FRAME_BYTES and more go to segments (the hosted backend's shm_threshold)
    dask worker: from_blob      each segment mapped and unlinked: the answer's frames (no copy)
    client: decode              each reference resolved to its received frame (no copy)

Before, each array was copied into the pickle at the client, through a pipe to the lane and out
of the pickle there, and the same on the way back: six copies of every byte beside dask's own
(4 x 100 MiB through ``a + 1`` took 1.3x ``client.map``'s time; see benchmarks/dask_arrays.py).

The dask worker still never unpickles anything of the caller's: it only moves bytes. Its host
needs room in /dev/shm for a chunk's arrays (a container's default of 64 MiB is too little for
one of 100 MiB). Without it (``to_blob`` returns None) the worker answers ``NoRoom`` at once,
nothing run, and the client sends the chunk again as one pickle (``PickleCodec.in_band``: the
path before frames, each array copied into it), charging no attempt, and from then on sends
chunks as big to that worker in-band at once: slower, never wrong (``Flights._refused``; see
benchmarks/dask_no_room.py). Results need no such answer: a lane that cannot write a result's
segment pickles it in-band.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Any

import numpy as np

from ... import _shm, _transport
from ..._shm import HEADER, MAGIC, Blob

__all__ = ["FRAME_BYTES", "Frames", "NoRoom", "decode", "encode", "from_blob", "to_blob"]

# Arrays this big travel as frames: below it, a memcpy into the pickle costs less than a frame
# (dask's per-frame header and, on the worker, a /dev/shm file: open, write, map, unlink).
FRAME_BYTES = 1 << 20


@dataclasses.dataclass(eq=False, slots=True)
class Frames:
    """A pickle (``uint8``, starting with an empty ``_transport`` header) whose arrays are
    references to ``frames``, by index. Not a tuple: ``client.scatter`` would scatter each part."""

    pickle: Any  # np.ndarray[uint8]
    frames: list[Any]  # np.ndarray[uint8] each

    @property
    def nbytes(self) -> int:
        return int(self.pickle.nbytes) + sum(int(frame.nbytes) for frame in self.frames)

    def __sizeof__(self) -> int:  # dask's memory accounting (its sizeof) asks this
        return self.nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class NoRoom:
    """A dask worker's answer to a chunk whose frames its host's /dev/shm could not take:
    nothing ran, nothing is left behind; the client sends the chunk again in-band."""

    where: str  # "dask worker <address>"
    nbytes: int  # the frames' size


class _FramePickler(_transport._Pickler):
    """``_transport``'s pickler, each big array set aside as a frame instead of a segment."""

    def __init__(self, file: io.BytesIO, *, read_only: bool) -> None:
        super().__init__(file, np, threshold=FRAME_BYTES, owner=os.getpid(), creator="p",
                         read_only=read_only)
        self.frames: list[Any] = []

    def _create(self, arr: Any) -> str | None:
        # The bytes in the order _transport's reference rebuilds (F only if not also C).
        flat = arr if arr.flags.c_contiguous else arr.T if arr.flags.f_contiguous else \
            np.ascontiguousarray(arr)
        self.frames.append(flat.reshape(-1).view(np.uint8))
        self.segments.append(str(len(self.frames)))  # its index: what the reference holds
        return self.segments[-1]


def has_big_array(items: list[Any]) -> bool:
    """Whether an item, or a member of an item that is a tuple, list or dict, is an ndarray of
    FRAME_BYTES or more (deeper ones travel in the pickle)."""
    for item in items:
        members = item.values() if isinstance(item, dict) else \
            item if isinstance(item, tuple | list) else (item,)
        if any(isinstance(m, np.ndarray) and m.nbytes >= FRAME_BYTES for m in members):
            return True
    return False


def encode(items: list[Any], *, read_only: bool) -> Frames | None:
    """The items with their big arrays as frames; None if none was set aside. Raises what
    pickling raises."""
    file = io.BytesIO()
    file.write(_shm.HEADER.pack(MAGIC, 0))
    pickler = _FramePickler(file, read_only=read_only)
    pickler.dump(items)
    if not pickler.frames:
        return None
    return Frames(np.frombuffer(file.getbuffer(), dtype=np.uint8), pickler.frames)


def to_blob(payload: Frames) -> bytes | None:
    """On the dask worker: a ``_transport`` blob of ``payload``, its frames copied into segments
    of this host that the caller must ``_shm.discard``; None (nothing left behind) when
    ``/dev/shm`` cannot take them."""
    names: list[str] = []
    try:
        for frame in payload.frames:
            if _shm.create_segment(frame, np, owner=os.getpid(), creator="p", arena=None,
                                   segments=names) is None:
                _shm.unlink_names(names)
                return None
    except BaseException:
        _shm.unlink_names(names)
        raise
    listed = "\n".join(names).encode("ascii")
    return b"".join((HEADER.pack(MAGIC, len(listed)), listed,
                     memoryview(payload.pickle)[HEADER.size:]))


def from_blob(blob: Blob) -> Any:
    """On the dask worker: the lanes' answer as dask should send it; its segments, if any,
    mapped and unlinked (their memory is freed with the last frame viewing it). Raises
    ``SegmentMissing`` if a segment is gone (the lane's host swept it)."""
    names, offset = _shm.parse(blob)
    if not names:
        return np.frombuffer(blob, dtype=np.uint8)
    frames = [np.asarray(_shm.map_segment(name, _segment_size(name), writable=True, unlink=True))
              for name in names]
    head = bytes(HEADER.pack(MAGIC, 0)) + bytes(memoryview(blob)[offset:])
    return Frames(np.frombuffer(head, dtype=np.uint8), frames)


def _segment_size(name: str) -> int:
    fd, _path = _shm._open(name, os.O_RDONLY)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def decode(payload: Frames, *, writable: bool = True) -> Any:
    """On the client: unpickle ``payload``, each array a view of its frame (``writable``: a
    frame dask received read-only is copied first; else the views keep their frames' flags)."""
    file = io.BytesIO(memoryview(payload.pickle)[HEADER.size:])
    unpickler = _FrameUnpickler(file, payload.frames, writable)
    try:
        return unpickler.load()
    finally:
        unpickler.memo.clear()  # the memo holds the bound _attach: a cycle holding every frame


class _FrameUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, frames: list[Any], writable: bool) -> None:
        super().__init__(file)
        self._frames, self._writable = frames, writable

    def find_class(self, module: str, name: str, /) -> Any:
        if name == "_attach" and module == _transport.__name__:
            return self._attach
        return super().find_class(module, name)

    def _attach(self, index: int, dtype: Any, shape: tuple[int, ...],
                order: _transport._Order) -> Any:
        raw = np.asarray(self._frames[index])
        if self._writable and not raw.flags.writeable:
            raw = raw.copy()
        return np.ndarray(shape, dtype, buffer=raw, order=order)
