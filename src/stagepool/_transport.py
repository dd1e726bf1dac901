"""Shared-memory transport of numpy arrays between the parent and its workers.

Big arrays leave the pickle stream and travel as named files in ``/dev/shm``; the pickle keeps only
a small reference (segment index, dtype, shape, order). Both directions work the same way:

    parent                                                   worker
    dumps(items, creator="p") ------ items blob ----------> loads(blob, unlink=False)
      writes /dev/shm/stagepool-{ppid}-p-{n}-{rnd}             read-only views (or private
                                                               copy-on-write views, writable=True)
                                                             fn(item) ...
    claim(blob)         <----------- result blob ---------- dumps(values, creator=f"w{pid}")
      renames ...-w{pid}-... to ...-c{pid}-...                writes /dev/shm/stagepool-{ppid}-w{pid}-...
    loads(blob, unlink=True): map, unlink, view
    discard(items blob) once the chunk is answered

A blob is a fixed header followed by the pickle (protocol 5, cloudpickle)::

    b"SPT1" | uint32 little-endian length L | L bytes: segment names joined by b"\\n" | pickle

so that ``segment_names``, ``claim`` and ``discard`` never unpickle.

Who frees what (nothing else ever unlinks a segment):

    ==========  ===========================  =====================================================
    spelling    created by                   freed by
    ==========  ===========================  =====================================================
    ``p``       the parent (inputs)          ``discard(items blob)`` once answered; ``sweep``
    ``w{pid}``  worker ``pid`` (results)     ``claim`` renames it to ``c``; ``sweep(owner,
                                             "w{pid}")`` when that worker died before the parent
                                             received the result
    ``c{pid}``  renamed by the parent        ``loads(unlink=True)``, or ``discard`` when the
                                             result is dropped; ``sweep(owner)`` at shutdown
    any         any                          ``abandon(owner)`` in each worker that sees its
                                             parent die (SIGKILL, SIGTERM), before it exits
    any         any                          ``sweep_stale()`` once the owner pid is gone (the
                                             path that does not need the parent to exit cleanly)
    ==========  ===========================  =====================================================

An unlinked segment stays in memory as long as some process maps it: the array the caller holds keeps
its memory alive until the caller drops it, then the kernel frees it.

This module is imported by workers, so it imports nothing heavy: numpy only inside functions that
see arrays (and only if the caller had already imported it), ctypes only the first time a segment is
mapped.
"""

from __future__ import annotations

import atexit
import errno
import io
import itertools
import math
import mmap
import os
import pickle
import re
import struct
import sys
import threading
import types
import weakref
from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import cloudpickle

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "SHM_DIR",
    "SegmentMissing",
    "abandon",
    "available",
    "claim",
    "discard",
    "dumps",
    "dumps_plain",
    "dumps_sized",
    "loads",
    "segment_names",
    "sweep",
    "sweep_stale",
]

SHM_DIR = "/dev/shm"
PREFIX = "stagepool-"
PICKLE_PROTOCOL = 5
MAGIC = b"SPT1"
_HEADER = struct.Struct("<4sI")
_EMPTY_HEADER = _HEADER.pack(MAGIC, 0)

# stagepool-{owner}-{p | w<pid> | c<pid>}-{counter}-{random hex}. Names read from a blob are checked
# against this before anything is renamed or unlinked, so a corrupt blob cannot name another file.
_NAME = re.compile(r"stagepool-([0-9]+)-(p|[wc][0-9]+)-[0-9]+-[0-9a-f]+")
_CREATOR = re.compile(r"p|w[0-9]+")

# Kinds whose bytes are the whole value (bool, ints, floats, complex, datetimes, bytes, str, void and
# structured). Everything else (object, numpy 2's StringDType, which points into a heap arena) is
# pickled normally.
_PLAIN_KINDS = frozenset("biufcmMSUV")

_Blob = bytes | bytearray | memoryview
_Order = Literal["C", "F"]
_counter = itertools.count()

# Input segments recycled by the parent within one batch (an "arena"). Filling fresh tmpfs pages
# costs about three times more than rewriting pages a file already has (measured 3.1 vs 0.9 ms
# for 8 MiB), and a media batch sends arrays of a few sizes over and over. A segment is recycled
# only once its chunk is answered and no worker still maps it (a worker that keeps an input array
# unlinks its file: see release_inputs). An arena holds at most RECYCLE_BYTES, and closing it (the
# batch ends) unlinks what it kept, so nothing outlives the batch.
RECYCLE_BYTES = 256 * 1024 * 1024
_arenas: dict[int, dict[int, list[str]]] = {}  # arena -> size in bytes -> names kept for reuse
_arena_bytes: dict[int, int] = {}
# Re-entrant: close_arena runs from generator finalizers, which the garbage collector may start
# inside recycle() in the same thread.
_free_lock = threading.RLock()
# Input segments this worker has mapped, by name, while any array still views them.
_live_inputs: weakref.WeakValueDictionary[str, _Mapping] = weakref.WeakValueDictionary()


class SegmentMissing(FileNotFoundError):
    """A segment named in a blob is no longer in ``/dev/shm``.

    It was already loaded with ``unlink=True``, discarded, or swept (its creator or owner died).
    """

    def __init__(self, segment: str) -> None:
        super().__init__(
            errno.ENOENT,
            f"shared-memory segment {segment} is gone (already loaded with unlink=True, discarded, "
            "or swept because the process that owned it died)",
            os.path.join(SHM_DIR, segment),
        )
        self.segment = segment

    def __reduce__(self) -> tuple[type[SegmentMissing], tuple[str]]:
        return (SegmentMissing, (self.segment,))  # a worker sends this back to the parent


def available() -> bool:
    """Whether ``/dev/shm`` exists and this process may create files in it."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


# ---- dumps ------------------------------------------------------------------------------------


def dumps(obj: object, *, threshold: int, owner: int, creator: str,
          arena: int | None = None) -> bytes:
    """Pickle ``obj``, moving each big numpy array into a new segment of ``/dev/shm``.

    ``dumps_sized`` does the same and also says how many bytes the blob and its segments hold.
    """
    return dumps_sized(obj, threshold=threshold, owner=owner, creator=creator, arena=arena)[0]


def dumps_sized(obj: object, *, threshold: int, owner: int, creator: str,
                arena: int | None = None) -> tuple[bytes, int]:
    """Pickle ``obj``, moving each big numpy array into a new segment of ``/dev/shm``; return the
    blob and the payload size (the blob's bytes plus its segments').

    A ``numpy.ndarray`` (or ``numpy.memmap``, which arrives as a plain ndarray) of at least
    ``threshold`` bytes, with at least one dimension and a dtype made of plain bytes (no objects,
    also inside structured dtypes) is copied once into a segment; non-contiguous arrays arrive
    C-contiguous, Fortran-ordered ones stay Fortran-ordered. Everything else, and everything when
    ``threshold`` is 0, is pickled as usual. The same array object referenced twice travels once.

    ``owner`` is the pid of the process that owns the engine; ``creator`` is ``"p"`` in that process
    and ``f"w{os.getpid()}"`` in a worker. The result always starts with the segment-name header.

    Failure behaviour: if a segment cannot be created or filled (``/dev/shm`` full, missing or not
    writable) that array is pickled normally instead: slower, never wrong, and never a SIGBUS (space
    is allocated by ``write``/``fallocate``, which report ENOSPC). If pickling raises (an unpicklable
    object, ``KeyboardInterrupt``), the segments already created are unlinked, then the original
    exception propagates.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables shared memory), got {threshold}")
    if owner <= 0:
        raise ValueError(f"owner must be a pid, got {owner}")
    if not _CREATOR.fullmatch(creator):
        raise ValueError(f"creator must be 'p' or 'w<pid>', got {creator!r}")
    file = io.BytesIO()
    file.write(_EMPTY_HEADER)
    numpy = _imported_numpy() if threshold > 0 else None
    if numpy is None:  # without numpy imported there is no ndarray to move
        _SourcePickler(file, protocol=PICKLE_PROTOCOL).dump(obj)
        blob = file.getvalue()  # shares BytesIO's buffer: no copy of a big inline pickle
        return blob, len(blob)
    pickler = _Pickler(file, numpy, threshold=threshold, owner=owner, creator=creator, arena=arena)
    try:
        pickler.dump(obj)
    except BaseException:
        _unlink_names(pickler.segments)
        raise
    if not pickler.segments:
        blob = file.getvalue()
        return blob, len(blob)
    names = "\n".join(pickler.segments).encode("ascii")
    with file.getbuffer() as pickled:  # small by now: the big arrays went to segments
        blob = b"".join((_HEADER.pack(MAGIC, len(names)), names, pickled[_HEADER.size :]))
    return blob, len(blob) + pickler.shm_bytes


def _imported_numpy() -> Any:
    """numpy if this process imported it, else None (no array can need moving, and none is
    imported for nothing). ``import`` rather than ``sys.modules`` alone: while another thread is
    still importing numpy, ``sys.modules`` holds a half-built module without ``ndarray``;
    ``import`` waits for that thread to finish."""
    if "numpy" not in sys.modules:
        return None
    import numpy

    return numpy


def _attach(index: int, dtype: object, shape: tuple[int, ...], order: _Order) -> object:
    """What a segment reference unpickles to; only ``loads`` can resolve it."""
    raise pickle.UnpicklingError(
        "this pickle holds numpy arrays in shared memory: read it with stagepool._transport.loads"
    )


_cloudpickle_reducer_override = cloudpickle.Pickler.reducer_override
_cloudpickle_code_reduce: Any = getattr(cloudpickle.cloudpickle, "_code_reduce", None)


def _code_reduce_keeping_file(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its real file name back in it.

    cloudpickle writes "<dynamic-code>" there (so that pickles of notebook code are
    reproducible), which made the worker's traceback of every callable pickled by value (a lambda,
    a closure, a classmethod, a function of ``__main__``) read 'File "<dynamic-code>"' with no
    source line. With the file name, the worker's traceback shows the file, line and source."""
    rebuild, args = _cloudpickle_code_reduce(code)
    return rebuild, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


class _SourcePickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle's pickler, keeping the file names of the code it pickles by value (a newer
    cloudpickle without ``_code_reduce`` keeps its own behaviour)."""

    if _cloudpickle_code_reduce is not None:
        # cloudpickle's own table with one entry replaced, not one more map in front: the C
        # pickler looks up every object's type here, and each map it misses costs a KeyError.
        _own, *_rest = cloudpickle.Pickler.dispatch_table.maps
        dispatch_table = ChainMap({**_own, types.CodeType: _code_reduce_keeping_file}, *_rest)


def dumps_plain(obj: object) -> bytes:
    """A plain pickle (no shared memory, no header) made by :class:`_SourcePickler`."""
    file = io.BytesIO()
    _SourcePickler(file, protocol=PICKLE_PROTOCOL).dump(obj)
    return file.getvalue()


class _Pickler(_SourcePickler):
    """cloudpickle's pickler, plus: big plain-dtype ndarrays become segment references.

    ``reducer_override`` rather than ``persistent_id``: the C pickler calls it only for non-builtin
    objects (not for every int and str), and memoizes its result, so a shared array travels once.
    """

    def __init__(self, file: io.BytesIO, numpy: Any, *, threshold: int, owner: int, creator: str,
                 arena: int | None = None) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.segments: list[str] = []
        self.shm_bytes = 0
        self._np = numpy
        self._array_types = (numpy.ndarray, numpy.memmap)
        self._threshold = threshold
        self._owner = owner
        self._prefix = f"{PREFIX}{owner}-{creator}-"
        self._arena = arena if creator == "p" and owner == os.getpid() else None

    def reducer_override(self, obj: object) -> Any:
        if type(obj) in self._array_types:
            return self._reduce_array(obj)  # type: ignore[arg-type]
        return _cloudpickle_reducer_override(self, obj)

    def _reduce_array(self, arr: NDArray[Any]) -> Any:
        if arr.nbytes < self._threshold or arr.ndim == 0 or not _plain(arr.dtype):
            return NotImplemented
        order: _Order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        name = self._create(arr)
        if name is None:
            return NotImplemented
        return (_attach, (len(self.segments) - 1, arr.dtype, arr.shape, order))

    def _create(self, arr: NDArray[Any]) -> str | None:
        name = _take_free(self._arena, arr.nbytes) if self._arena is not None else None
        if name is not None:  # a recycled input segment of the right size: its pages exist
            path = os.path.join(SHM_DIR, name)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                return None
        else:
            name = f"{self._prefix}{next(_counter)}-{os.urandom(4).hex()}"
            path = os.path.join(SHM_DIR, name)
            with _abandon_lock:  # a file made after abandon()'s sweep would outlive everyone
                if self._owner in _abandoned:
                    return None
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                except OSError:
                    return None
        self.segments.append(name)  # from here on, a failure of dump() unlinks it
        try:
            _fill(fd, arr, self._np)
        except OSError:
            self.segments.pop()
            _unlink(path)
            return None
        finally:
            os.close(fd)
        self.shm_bytes += arr.nbytes
        return name


def _plain(dtype: np.dtype[Any]) -> bool:
    """Whether an array of ``dtype`` is fully described by its bytes."""
    if dtype.hasobject:
        return False
    if dtype.fields is not None:
        return all(_plain(field[0]) for field in dtype.fields.values())
    if dtype.subdtype is not None:
        return _plain(dtype.subdtype[0])
    return dtype.kind in _PLAIN_KINDS


def _fill(fd: int, arr: NDArray[Any], numpy: Any) -> None:
    """Copy ``arr``'s bytes (C order, or F order if it is Fortran-contiguous) into the empty file.

    Contiguous arrays go through ``write``: measured 3.6 ms for 8 MiB against 11 ms for
    ftruncate + mmap + memcpy (the page faults of a fresh tmpfs mapping dominate), and a full
    ``/dev/shm`` is an OSError instead of a SIGBUS. Other arrays need a strided copy, done once,
    into a mapping whose pages ``fallocate`` reserved first (ENOSPC, not SIGBUS).
    """
    nbytes = arr.nbytes
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        data = memoryview(arr.ravel(order="K").view(numpy.uint8))  # datetime64 has no buffer
        done = 0
        while done < nbytes:  # one call unless the array exceeds Linux's ~2 GiB per write
            done += os.pwrite(fd, data[done:], done)  # at 0: a recycled file is overwritten
        return
    os.posix_fallocate(fd, 0, nbytes)
    with mmap.mmap(fd, nbytes) as mm:
        dst = numpy.ndarray(arr.shape, arr.dtype, buffer=mm)
        try:
            numpy.copyto(dst, arr, casting="no")
        finally:
            del dst  # release the buffer export, or closing the mmap raises BufferError


# ---- the header -------------------------------------------------------------------------------


def segment_names(blob: _Blob) -> list[str]:
    """The segment names a blob refers to, read from its header (never unpickles).

    Raises ``ValueError`` if ``blob`` is not a transport blob or names something that is not one of
    our segments.
    """
    return _parse(blob)[0]


def _parse(blob: _Blob) -> tuple[list[str], int]:
    """(segment names, offset of the pickle)."""
    try:
        magic, length = _HEADER.unpack_from(blob)
    except struct.error:
        magic, length = b"", 0
    if magic != MAGIC:
        raise ValueError("not a stagepool transport blob (it does not start with b'SPT1')")
    start = _HEADER.size
    if length == 0:
        return [], start
    names = bytes(memoryview(blob)[start : start + length]).decode("ascii", "replace").split("\n")
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"corrupt transport blob: {name!r} is not a stagepool segment name")
    return names, start + length


def _claimed(name: str) -> str:
    """``stagepool-O-w123-N-R`` -> ``stagepool-O-c123-N-R``; other names unchanged."""
    prefix, owner, tag, rest = name.split("-", 3)
    return f"{prefix}-{owner}-c{tag[1:]}-{rest}" if tag[0] == "w" else name


def _spellings(name: str) -> tuple[str, ...]:
    claimed = _claimed(name)
    return (claimed, name) if claimed != name else (name,)


# ---- claim, loads, discard --------------------------------------------------------------------


def claim(blob: _Blob) -> None:
    """Rename the worker's ``w`` segments of a received result to ``c``: the parent owns them now.

    A later ``sweep(owner, "w{pid}")`` of a dead worker's unclaimed results then leaves them alone.
    Each rename is atomic. A missing segment raises nothing here (``loads`` reports it); a blob that
    is not ours raises ``ValueError``; any other OSError from rename propagates.
    """
    for name in segment_names(blob):
        claimed = _claimed(name)
        if claimed != name:
            try:
                os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, claimed))
            except FileNotFoundError:
                pass


def loads(blob: _Blob, *, writable: bool = False, unlink: bool, lazy: bool = False) -> object:
    """Unpickle a blob from ``dumps``; each segment becomes an ndarray that maps it (no copy).

    The arrays are read-only views by default (writing raises ``ValueError``: the sender may map
    the same pages). ``writable=True`` gives private copy-on-write views instead: writing costs a
    page copy on first touch and never reaches the segment, the sender or any other reader.

    With ``unlink=True`` each segment file is unlinked right after it is mapped; the memory lives
    on until the last array viewing it is garbage collected. The segments are then this process's
    alone (the sender wrote and closed them), so ``writable=True`` maps them shared: writes cost no
    page copy and still reach nobody else. The blob is then consumed: if loading
    fails, every segment it names is unlinked before the exception propagates. With
    ``unlink=False`` (a worker reading inputs) nothing is unlinked, even on failure.

    ``lazy=True`` (read-only, ``unlink=False``) is for the process that wrote the blob and wants
    its contents back without a second copy: pages are mapped on first read, so an unread view
    costs no RSS, and the views stay valid when the segments are later unlinked.

    Raises ``SegmentMissing`` (a ``FileNotFoundError``) naming the segment if one is gone,
    ``ValueError`` for a blob that is not ours or a segment of the wrong size, and whatever
    unpickling raises.
    """
    names, offset = _parse(blob)
    if not names:
        return pickle.loads(memoryview(blob)[offset:])
    file = io.BytesIO(blob)  # shares a bytes blob's buffer
    file.seek(offset)
    if lazy and (writable or unlink):
        raise ValueError("lazy=True gives read-only views of segments left in place")
    unpickler = _Unpickler(file, names, writable=writable, unlink=unlink, lazy=lazy)
    try:
        value = unpickler.load()
    except BaseException:
        if unlink:
            discard(blob)
        raise
    finally:
        # The memo holds the bound ``_attach`` (memoized as a global), which holds the unpickler:
        # a cycle that would keep every array of the blob, and its segment, alive until the
        # garbage collector's next pass instead of until the caller drops it.
        unpickler.memo.clear()
    if unlink and len(unpickler.mapped) < len(names):  # named but never referenced: still ours
        _unlink_names(n for i, n in enumerate(names) if i not in unpickler.mapped)
    return value


class _Unpickler(pickle.Unpickler):
    """Resolves segment references (``_attach``) to arrays mapping the segment."""

    def __init__(self, file: io.BytesIO, names: list[str], *, writable: bool, unlink: bool,
                 lazy: bool) -> None:
        super().__init__(file)
        self.mapped: set[int] = set()
        self._names = names
        self._writable = writable
        self._unlink = unlink
        self._lazy = lazy

    def find_class(self, module: str, name: str, /) -> Any:
        if name == "_attach" and module == __name__:
            return self._attach
        return super().find_class(module, name)

    def _attach(self, index: int, dtype: Any, shape: tuple[int, ...], order: _Order) -> object:
        import numpy

        nbytes = math.prod(shape) * dtype.itemsize
        raw = numpy.asarray(_map(self._names[index], nbytes, writable=self._writable,
                                 unlink=self._unlink, lazy=self._lazy))
        self.mapped.add(index)
        return numpy.ndarray(shape, dtype, buffer=raw, order=order)


def release_inputs(blob: _Blob) -> None:
    """In a worker, once a chunk is done: unlink each input segment an array still maps.

    The function (or the result) kept a reference to an input array, so its memory must never be
    recycled by the parent; unlinking the name takes it out of the parent's reach while the
    mapping, and the array, stay valid here."""
    for name in segment_names(blob):
        if name in _live_inputs:
            _unlink(os.path.join(SHM_DIR, name))


def open_arena(arena: int) -> None:
    """Start recycling input segments for one batch (see RECYCLE_BYTES)."""
    with _free_lock:
        _arenas.setdefault(arena, {})
        _arena_bytes.setdefault(arena, 0)


def close_arena(arena: int) -> None:
    """The batch is over: unlink every segment its arena kept. Later recycles of the arena's
    inputs (answers arriving after an abandoned batch) unlink at once."""
    with _free_lock:
        kept = _arenas.pop(arena, {})
        _arena_bytes.pop(arena, None)
    _unlink_names(name for names in kept.values() for name in names)


def recycle(blob: _Blob, arena: int | None = None) -> None:
    """In the parent, once a chunk is answered: keep its input segments for reuse by the same
    open arena (up to RECYCLE_BYTES), unlink the rest. A segment a worker unlinked (because it
    still maps it) is gone already and is skipped."""
    for name in segment_names(blob):
        path = os.path.join(SHM_DIR, name)
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        with _free_lock:
            free = _arenas.get(arena) if arena is not None else None
            used = _arena_bytes.get(arena) if arena is not None else None
            if free is not None and used is not None and used + size <= RECYCLE_BYTES:
                free.setdefault(size, []).append(name)
                _arena_bytes[arena] = used + size  # type: ignore[index]
                continue
        _unlink(path)


def _take_free(arena: int, nbytes: int) -> str | None:
    with _free_lock:
        names = _arenas.get(arena, {}).get(nbytes)
        if not names or arena not in _arena_bytes:
            return None
        _arena_bytes[arena] -= nbytes
        return names.pop()


@atexit.register
def _close_all_arenas() -> None:
    for arena in list(_arenas):
        close_arena(arena)


def discard(blob: _Blob) -> None:
    """Unlink every segment a blob names, claimed or not; missing ones are ignored.

    For a result that will never be loaded (a cancelled batch) and for inputs once their chunk is
    answered. Never unpickles. Arrays already mapped from these segments stay valid.
    """
    _unlink_names(segment_names(blob))


def _unlink_names(names: Iterable[str]) -> None:
    for name in names:
        for spelling in _spellings(name):
            _unlink(os.path.join(SHM_DIR, spelling))


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# ---- mapping ----------------------------------------------------------------------------------


class _Mapping:
    """One mmap of a segment, exposed to numpy as a flat uint8 buffer; unmapped when collected.

    numpy keeps this object as the base of every array viewing it, so ``munmap`` runs when the
    last of them is gone. Not ``mmap.mmap``: before Python 3.13 it keeps a dup of the file
    descriptor open for the mapping's lifetime, and a report of 1,000 result arrays would then hold
    1,000 descriptors, past the usual ``ulimit -n`` of 1024.
    """

    __slots__ = ("__array_interface__", "__weakref__", "_addr", "_munmap", "_size")

    def __init__(self, addr: int, size: int, readonly: bool, munmap: Callable[[int, int], int]) -> None:
        self._addr = addr
        self._size = size
        self._munmap = munmap
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (addr, readonly),
                                    "version": 3}

    def __del__(self) -> None:
        self._munmap(self._addr, self._size)


_libc: tuple[Callable[..., int | None], Callable[[int, int], int]] | None = None


def _libc_mmap() -> tuple[Callable[..., int | None], Callable[[int, int], int]]:
    global _libc
    if _libc is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, munmap_fn = libc.mmap, libc.munmap
        mmap_fn.restype = ctypes.c_void_p
        mmap_fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            ctypes.c_long)
        munmap_fn.restype = ctypes.c_int
        munmap_fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc = (mmap_fn, munmap_fn)
    return _libc


_MAP_FAILED = (1 << (8 * struct.calcsize("P"))) - 1
# Read-only mappings are populated at once: one call instead of a page fault per 4 KiB (measured
# 1.2 vs 2.5 ms to map and read 8 MiB). Not the writable ones: populating a private writable
# mapping copies every page, which is exactly what copy-on-write is there to avoid.
# The same for a segment this process takes over (``unlink=True``: nobody else can open it once it
# is unlinked, and its writer closed it): a shared writable mapping is then private in effect, so
# the caller's array is writable without copy-on-write faults, and populated at once.
_READ_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(name: str, nbytes: int, *, writable: bool, unlink: bool, lazy: bool = False) -> _Mapping:
    """Map a segment (its claimed spelling first), after checking its size; optionally unlink it."""
    owned = writable and unlink
    fd, path = _open(name, os.O_RDWR if owned else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:  # mapping past the end of a file would SIGBUS on first touch
            raise ValueError(f"shared-memory segment {name} holds {size} bytes, expected {nbytes}")
        mmap_fn, munmap_fn = _libc_mmap()
        if owned:
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, _READ_FLAGS
        elif writable:
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
        else:
            prot, flags = mmap.PROT_READ, mmap.MAP_SHARED if lazy else _READ_FLAGS
        addr = mmap_fn(None, nbytes, prot, flags, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            import ctypes

            code = ctypes.get_errno()
            raise OSError(code, f"mmap of {name} failed: {os.strerror(code)}")
    finally:
        os.close(fd)
    if unlink:
        _unlink(path)
    mapping = _Mapping(addr, nbytes, not writable, munmap_fn)
    if not unlink and not lazy:  # an input in a worker: see release_inputs
        _live_inputs[name] = mapping
    return mapping


def _open(name: str, mode: int) -> tuple[int, str]:
    for spelling in _spellings(name):
        path = os.path.join(SHM_DIR, spelling)
        try:
            return os.open(path, mode), path
        except FileNotFoundError:
            continue
    raise SegmentMissing(name)


# ---- sweeping ---------------------------------------------------------------------------------


def sweep(owner: int, creator: str | None = None) -> int:
    """Unlink the segments of engine owner ``owner``; with ``creator``, only that creator's.

    ``creator="w1234"`` removes worker 1234's unclaimed results (call it once that worker is dead
    and its pipe drained: a result still in the pipe would then fail with ``SegmentMissing``);
    ``"p"`` the parent's inputs; ``None`` everything, claimed results included (shutdown). Arrays
    already mapped stay valid. Returns how many files were unlinked; 0 if ``/dev/shm`` is missing.
    """
    prefix = f"{PREFIX}{owner}-" if creator is None else f"{PREFIX}{owner}-{creator}-"
    return sum(_unlink(os.path.join(SHM_DIR, name)) for name in _listing() if name.startswith(prefix))


def abandon(owner: int) -> int:
    """The engine process ``owner`` died: unlink its segments (nobody else will now), and from
    now on make none for it in this process (such arrays are pickled inline). Returns how many
    files were unlinked.

    For a worker on its way out, in whichever thread notices first: a segment the other thread
    is creating at that moment is either made before the sweep (and swept) or refused.
    """
    with _abandon_lock:
        _abandoned.add(owner)
    return sweep(owner)


_abandoned: set[int] = set()
_abandon_lock = threading.Lock()


def sweep_stale() -> int:
    """Unlink every segment whose owner pid is no longer alive; returns how many. For engine start.

    This is the cleanup after a parent that was SIGKILLed (its workers exit on their own). Limits:
    a reused owner pid hides its segments until that process exits too, and a live engine in
    another pid namespace sharing this ``/dev/shm`` would look dead.
    """
    alive: dict[int, bool] = {}
    count = 0
    for name in _listing():
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        owner = int(match.group(1))
        if owner not in alive:
            alive[owner] = _alive(owner)
        if not alive[owner]:
            count += _unlink(os.path.join(SHM_DIR, name))
    return count


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _listing() -> list[str]:
    try:
        return [name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)]
    except OSError:
        return []
