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

A blob is a header naming its segments followed by the pickle (protocol 5, cloudpickle). The
header's format and the segments' lifecycle (names, creation, mapping, claim, sweeping, who frees
what) live in ``_shm``.

This module is imported by workers, so it imports nothing heavy: numpy only inside functions that
see arrays (and only if the caller had already imported it).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import sys
import types
from array import array
from collections import ChainMap
from typing import TYPE_CHECKING, Any, Literal

import cloudpickle

from ._compiled import tinyloop
from ._shm import HEADER, MAGIC, Blob, create_segment, discard, map_segment, parse, unlink_names

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["OverBudget", "dumps", "dumps_plain", "dumps_sized", "imported_numpy", "loads",
           "packed"]

PICKLE_PROTOCOL = 5
_EMPTY_HEADER = HEADER.pack(MAGIC, 0)
_CREATOR = re.compile(r"p|[ws][0-9]+")


class OverBudget(Exception):
    """``dumps_sized``'s ``budget`` was reached: nothing was kept (no segment is left)."""

    def __init__(self, budget: int) -> None:
        super().__init__(f"the payload passed its budget of {budget} bytes")
        self.budget = budget


# Kinds whose bytes are the whole value (bool, ints, floats, complex, datetimes, bytes, str, void and
# structured). Everything else (object, numpy 2's StringDType, which points into a heap arena) is
# pickled normally.
_PLAIN_KINDS = frozenset("biufcmMSUV")

_Order = Literal["C", "F"]

# ---- packed lists -----------------------------------------------------------------------------

# Lists shorter than this pickle as they are. Packing saves ~20-60 ns an item and costs ~8 us a
# chunk's round trip (pack twice, ``_unpacked`` looked up twice): measured side by side per
# chunk (encode, worker decode, answer encode, decode), small ints, int16 and floats broke even
# at ~200 items (1.10x slower at 128, 1.17-1.21x at 64), ints past 32 bits at ~64.
PACK_MIN = 256
_pack = None if tinyloop is None else tinyloop.pack


def packed(values: object) -> object:
    """``values``, or what pickles in its place: a list of at least PACK_MIN exact ints that fit
    in 64 bits, or of exact floats, travels as the raw bytes of an ``array`` (the narrowest
    integer type that holds them) and unpickles as an equal list of the same types. Pickling
    and unpickling 10,000 ints took ~270 and ~350 us as a list, ~155 and ~270 packed; 10,000
    floats ~240 and ~450, ~30 and ~280 (timeit, one loaded 2-CPU machine: the list's opcodes
    are interpreted one by one, ``array.tolist`` makes the numbers in one C loop).
    Anything else (bools, subclasses, numpy scalars, a mix, a big int) is returned as it is,
    and so is everything where the C extension was not built (``_compiled``)."""
    if _pack is None or type(values) is not list or len(values) < PACK_MIN:
        return values
    raw = _pack(values)
    return values if raw is None else _Packed(*raw)


class _Packed:
    """Pickles as ``_unpacked(typecode, byte order, raw)``."""

    __slots__ = ("_args",)

    def __init__(self, typecode: str, raw: bytes) -> None:
        self._args = (typecode, sys.byteorder, raw)

    def __reduce__(self) -> tuple[Any, tuple[str, str, bytes]]:
        return _unpacked, self._args


# What travels beside a packed list in a worker's answer (stamps, no errors, pid).
_WIRE_SCALARS = frozenset({bytes, int, type(None)})


def _packed_wire(obj: object) -> bool:
    """Whether ``obj`` is a packed list, alone or first in a tuple of plain scalars (a worker's
    answer): the C pickler then writes the very bytes cloudpickle would, without cloudpickle's
    ~4 us set-up and its ~6 us of Python to decide that ``_unpacked`` goes by reference, which
    made packing slower than the plain list below ~500 items."""
    if type(obj) is _Packed:
        return True
    return (type(obj) is tuple and len(obj) > 0 and type(obj[0]) is _Packed
            and all(type(x) in _WIRE_SCALARS for x in obj[1:]))


def _unpacked(typecode: str, order: str, raw: bytes) -> list[Any]:
    """The list a ``_Packed`` stood for (a dask worker may have the other byte order)."""
    values = array(typecode, raw)
    if order != sys.byteorder:
        values.byteswap()
    return values.tolist()


# ---- dumps ------------------------------------------------------------------------------------


def dumps(obj: object, *, threshold: int, owner: int, creator: str,
          arena: int | None = None, read_only: bool = False, writable: bool = False) -> bytes:
    """Pickle ``obj``, moving each big numpy array into a new segment of ``/dev/shm``.

    ``dumps_sized`` does the same and also says how many bytes the blob and its segments hold.
    """
    return dumps_sized(obj, threshold=threshold, owner=owner, creator=creator, arena=arena,
                       read_only=read_only, writable=writable)[0]


def dumps_sized(obj: object, *, threshold: int, owner: int, creator: str,
                arena: int | None = None, read_only: bool = False,
                writable: bool = False, budget: int | None = None) -> tuple[bytes, int]:
    """Pickle ``obj``, moving each big numpy array into a new segment of ``/dev/shm``; return the
    blob and the payload size (the blob's bytes plus its segments').

    A ``numpy.ndarray`` (or ``numpy.memmap``, which arrives as a plain ndarray) of at least
    ``threshold`` bytes, with at least one dimension and a dtype made of plain bytes (no objects,
    also inside structured dtypes) is copied once into a segment; non-contiguous arrays arrive
    C-contiguous, Fortran-ordered ones stay Fortran-ordered. Everything else, and everything when
    ``threshold`` is 0, is pickled as usual. The same array object referenced twice travels once.
    ``read_only=True``: the arrays pickled inline unpickle read-only too, so that the reader sees
    read-only arrays at every size, not only from ``threshold`` up. ``writable=True`` (results):
    a read-only array pickled inline (a function returning its read-only input) is copied, so
    that the reader gets an ordinary writable array.

    ``owner`` is the pid of the process that owns the engine; ``creator`` is ``"p"`` in that process
    and ``f"w{os.getpid()}"`` in a worker. The result always starts with the segment-name header.

    ``budget`` (bytes): raise ``OverBudget`` once the payload would pass it, the segments made
    so far unlinked. Checked before each array is written (so shared memory never holds more
    than the budget for this call) and at the end (other objects are written by the C pickler
    without a look: a pickle of big ``bytes`` is made whole, then refused).

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
        raise ValueError(f"creator must be 'p', 'w<pid>' or 's<n>', got {creator!r}")
    obj = packed(obj)
    file = io.BytesIO()
    file.write(_EMPTY_HEADER)
    plain = _packed_wire(obj)
    numpy = None if plain or not (threshold > 0 or read_only or writable) else imported_numpy()
    if numpy is None:  # no ndarray to move: numpy not imported, or a packed list
        (pickle.Pickler if plain else _SourcePickler)(file, protocol=PICKLE_PROTOCOL).dump(obj)
        blob = file.getvalue()  # shares BytesIO's buffer: no copy of a big inline pickle
        if budget is not None and len(blob) > budget:
            raise OverBudget(budget)
        return blob, len(blob)
    pickler = _Pickler(file, numpy, threshold=threshold, owner=owner, creator=creator, arena=arena,
                       read_only=read_only, writable=writable, budget=budget)
    try:
        pickler.dump(obj)
        if budget is not None and file.tell() + pickler.shm_bytes > budget:
            raise OverBudget(budget)
    except BaseException:
        unlink_names(pickler.segments)
        raise
    if not pickler.segments:
        blob = file.getvalue()
        return blob, len(blob)
    names = "\n".join(pickler.segments).encode("ascii")
    with file.getbuffer() as pickled:  # small by now: the big arrays went to segments
        blob = b"".join((HEADER.pack(MAGIC, len(names)), names, pickled[HEADER.size :]))
    return blob, len(blob) + pickler.shm_bytes


def imported_numpy() -> Any:
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
                 arena: int | None = None, read_only: bool = False,
                 writable: bool = False, budget: int | None = None) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.segments: list[str] = []
        self.shm_bytes = 0
        self._np = numpy
        self._array_types = (numpy.ndarray, numpy.memmap)
        self._threshold = threshold
        self._read_only = read_only
        self._writable = writable
        self._owner = owner
        self._creator = creator
        self._arena = arena if creator == "p" and owner == os.getpid() else None
        self._file, self._budget = file, budget

    def reducer_override(self, obj: object) -> Any:
        if type(obj) in self._array_types:
            if self._budget is not None and (self._file.tell() + self.shm_bytes
                                             + obj.nbytes > self._budget):  # type: ignore[attr-defined]
                raise OverBudget(self._budget)
            return self._reduce_array(obj)  # type: ignore[arg-type]
        return _cloudpickle_reducer_override(self, obj)

    def _reduce_array(self, arr: NDArray[Any]) -> Any:
        threshold = self._threshold
        if threshold and arr.nbytes >= threshold and arr.ndim and _plain(arr.dtype):
            order: _Order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
            if self._create(arr) is not None:
                return (_attach, (len(self.segments) - 1, arr.dtype, arr.shape, order))
        if self._read_only:  # numpy's own reduction, wrapped: one call more per array
            return (_read_only_array, (arr.__reduce_ex__(PICKLE_PROTOCOL),))
        if self._writable and not arr.flags.writeable:  # else it unpickles read-only
            return arr.copy().__reduce_ex__(PICKLE_PROTOCOL)
        return NotImplemented

    def _create(self, arr: NDArray[Any]) -> str | None:
        name = create_segment(arr, self._np, owner=self._owner, creator=self._creator,
                              arena=self._arena, segments=self.segments)
        if name is not None:
            self.shm_bytes += arr.nbytes
        return name


# Arrays this process has unpickled read-only by ``_read_only_array``: a worker compares the count
# before and after loading a chunk to know whether its items hold any (then a "read-only" error
# gets a note saying how to get writable inputs).
read_only_arrays = 0


def _read_only_array(reduced: tuple[Any, ...]) -> object:
    """Rebuild an array from numpy's own reduction (``(rebuild, args[, state])``), read-only."""
    global read_only_arrays
    read_only_arrays += 1
    rebuild, args, *rest = reduced
    arr = rebuild(*args)
    if rest and rest[0] is not None:
        arr.__setstate__(rest[0])
    arr.flags.writeable = False
    return arr


def _plain(dtype: np.dtype[Any]) -> bool:
    """Whether an array of ``dtype`` is fully described by its bytes."""
    if dtype.hasobject:
        return False
    if dtype.fields is not None:
        return all(_plain(field[0]) for field in dtype.fields.values())
    if dtype.subdtype is not None:
        return _plain(dtype.subdtype[0])
    return dtype.kind in _PLAIN_KINDS


# ---- loads ------------------------------------------------------------------------------------


def loads(blob: Blob, *, writable: bool = False, unlink: bool, lazy: bool = False) -> object:
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
    names, offset = parse(blob)
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
        unlink_names(n for i, n in enumerate(names) if i not in unpickler.mapped)
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
        raw = numpy.asarray(map_segment(self._names[index], nbytes, writable=self._writable,
                                 unlink=self._unlink, lazy=self._lazy))
        self.mapped.add(index)
        return numpy.ndarray(shape, dtype, buffer=raw, order=order)
