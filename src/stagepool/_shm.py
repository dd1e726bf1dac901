"""The lifecycle of the shared-memory segments that carry numpy arrays (``_transport`` pickles).

A segment is a file ``/dev/shm/stagepool-{owner}-{p | w<pid> | c<pid>}-{counter}-{random hex}``:
created and filled by ``create_segment``, mapped by ``map_segment``, renamed by ``claim``, freed by
the functions below. A blob (see ``_transport``) starts with a header naming its segments::

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
    ``s{n}``    the parent (engine n's       ``sweep(owner, "s{n}")`` when that engine's
                shared data, ``_shared``)    backend closes
    any         any                          ``abandon(owner)`` in each worker that sees its
                                             parent die (SIGKILL, SIGTERM), before it exits
    any         any                          ``sweep_stale()`` once the owner pid is gone (the
                                             path that does not need the parent to exit cleanly)
    ==========  ===========================  =====================================================

An unlinked segment stays in memory as long as some process maps it: the array the caller holds keeps
its memory alive until the caller drops it, then the kernel frees it.

This module is imported by workers, so it imports nothing heavy: ctypes only the first time a
segment is mapped, numpy only as the module the caller passes in.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import mmap
import os
import re
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _recycling

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "SHM_DIR",
    "SegmentMissing",
    "abandon",
    "available",
    "claim",
    "close_arena",
    "create_segment",
    "discard",
    "map_segment",
    "open_arena",
    "parse",
    "recycle",
    "release_inputs",
    "segment_names",
    "sweep",
    "sweep_stale",
    "unlink_names",
]

SHM_DIR = "/dev/shm"
PREFIX = "stagepool-"
MAGIC = b"SPT1"
HEADER = struct.Struct("<4sI")

# stagepool-{owner}-{p | w<pid> | c<pid>}-{counter}-{random hex}. Names read from a blob are checked
# against this before anything is renamed or unlinked, so a corrupt blob cannot name another file.
_NAME = re.compile(r"stagepool-([0-9]+)-(p|[wcs][0-9]+)-[0-9]+-[0-9a-f]+")

Blob = bytes | bytearray | memoryview
_counter = itertools.count()

# Input segments a batch keeps for reuse: see _recycling.
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


# ---- creating ---------------------------------------------------------------------------------


def create_segment(arr: NDArray[Any], numpy: Any, *, owner: int, creator: str, arena: int | None,
                   segments: list[str]) -> str | None:
    """Copy ``arr`` into a segment (a recycled one of ``arena`` if one has its size) and return its
    name, appended to ``segments`` before it is filled so that the caller's failure path (which
    unlinks ``segments``) covers a fill interrupted by ``KeyboardInterrupt``.

    Returns None, leaving nothing behind, if the file cannot be created or filled (``/dev/shm``
    full, missing or not writable) or ``owner`` was abandoned in this process.
    """
    name = _recycling.take(arena, arr.nbytes) if arena is not None else None
    if name is not None:  # a recycled input segment of the right size: its pages exist
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
    else:
        name = f"{PREFIX}{owner}-{creator}-{next(_counter)}-{os.urandom(4).hex()}"
        path = os.path.join(SHM_DIR, name)
        with _abandon_lock:  # a file made after abandon()'s sweep would outlive everyone
            if owner in _abandoned:
                return None
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except OSError:
                return None
    segments.append(name)  # from here on, a failure of the caller unlinks it
    try:
        _fill(fd, arr, numpy)
    except OSError:
        segments.pop()
        _unlink(path)
        return None
    finally:
        os.close(fd)
    return name


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


def segment_names(blob: Blob) -> list[str]:
    """The segment names a blob refers to, read from its header (never unpickles).

    Raises ``ValueError`` if ``blob`` is not a transport blob or names something that is not one of
    our segments.
    """
    return parse(blob)[0]


def parse(blob: Blob) -> tuple[list[str], int]:
    """(segment names, offset of the pickle)."""
    try:
        magic, length = HEADER.unpack_from(blob)
    except struct.error:
        magic, length = b"", 0
    if magic != MAGIC:
        raise ValueError("not a stagepool transport blob (it does not start with b'SPT1')")
    start = HEADER.size
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


# ---- claim, release, recycle, discard ---------------------------------------------------------


def claim(blob: Blob) -> None:
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


def release_inputs(blob: Blob) -> None:
    """In a worker, once a chunk is done: unlink each input segment an array still maps.

    The function (or the result) kept a reference to an input array, so its memory must never be
    recycled by the parent; unlinking the name takes it out of the parent's reach while the
    mapping, and the array, stay valid here."""
    for name in segment_names(blob):
        if name in _live_inputs:
            _unlink(os.path.join(SHM_DIR, name))


def open_arena(arena: int) -> None:
    """Start recycling input segments for one batch (see ``_recycling``)."""
    _recycling.open(arena)


def close_arena(arena: int) -> None:
    """The batch is over: unlink every segment its arena kept. Later recycles of the arena's
    inputs (answers arriving after an abandoned batch) unlink at once."""
    unlink_names(_recycling.close(arena))


def recycle(blob: Blob, arena: int | None = None) -> None:
    """In the parent, once a chunk is answered: keep its input segments for reuse by the same
    open arena (``_recycling.keep`` decides), unlink the rest. A segment a worker unlinked
    (because it still maps it) is gone already and is skipped."""
    for name in segment_names(blob):
        path = os.path.join(SHM_DIR, name)
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        if not _recycling.keep(arena, name, size):
            _unlink(path)


@atexit.register
def _close_all_arenas() -> None:
    for arena in _recycling.open_arenas():
        close_arena(arena)


def discard(blob: Blob) -> None:
    """Unlink every segment a blob names, claimed or not; missing ones are ignored.

    For a result that will never be loaded (a cancelled batch) and for inputs once their chunk is
    answered. Never unpickles. Arrays already mapped from these segments stay valid.
    """
    unlink_names(segment_names(blob))


def unlink_names(names: Iterable[str]) -> None:
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


def map_segment(name: str, nbytes: int, *, writable: bool, unlink: bool, lazy: bool = False) -> _Mapping:
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
