"""Read-only data shared with every worker (``Engine(shared={...})``, ``stagepool.shared(name)``),
and the initializer's arguments, both handed to workers through ``/dev/shm`` instead of the pipe
that starts a worker process.

    Engine(shared={"filterbank": fb})           worker (any, also one that replaces a dead one)
      publish(): one pickle, big arrays in        attach(): maps the arrays read-only, unpickles
        their own segments ------- names -------->  the rest once; stagepool.shared("filterbank")
      withdraw() at shutdown: unlinks them         is then a read-only view of the same pages

Why not through the start pipe: a worker's start-up arguments are written into a pipe that the
child reads only once its interpreter runs, so anything over the pipe buffer (64 KiB) blocked
``Engine()`` (2.2 s for 1 MiB of ``initargs``) and stalled the pool thread on every respawn. Now
a worker receives only segment names; its setup stays a few hundred bytes whatever the data.

Who frees what: every segment of one engine is named ``stagepool-{owner}-s{n}-...``; the backend
unlinks them all with ``withdraw`` when it closes (after its workers are gone). If the owner
dies without closing (SIGKILL), its workers' ``_shm.abandon`` and the next engine's
``_shm.sweep_stale`` free them, as for every other segment of that owner.

This module is imported by workers, so it imports nothing heavy (numpy only if already loaded).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

from . import _shm, _transport

__all__ = ["Published", "attach", "boot", "freeze", "publish", "serving", "shared", "withdraw"]

# Shared arrays this big get a segment of their own; smaller ones travel inside the pickle (each
# worker then holds its own few KiB, read-only all the same). Keeps a table of thousands of tiny
# arrays from becoming thousands of files.
SEGMENT_MIN_BYTES = 64 * 1024
_engines = itertools.count(1)
_files = itertools.count()


class Published(NamedTuple):
    """What a backend placed in ``/dev/shm`` for its workers (``None``: nothing of that kind)."""

    tag: str  # the creator spelling of every segment made for this engine ("s<n>")
    shared: str | None  # the segment holding the blob of the shared values
    boot: str | None  # the segment holding the blob of (initializer, initargs)


def publish(values: Mapping[str, Any], initializer: Callable[..., object] | None,
            initargs: tuple[Any, ...], *, owner: int) -> Published:
    """Pickle the shared values (arrays read-only) and the initializer with its arguments once,
    into segments; a worker gets their names. Raises ``TypeError`` naming the shared value or
    ``initargs`` that cannot be pickled, having unlinked whatever it made; ``OSError`` if
    ``/dev/shm`` is full."""
    tag = f"s{next(_engines)}"
    try:
        shared = _store(values, tag, owner, read_only=True, what=_shared_name) if values else None
        start = (initializer, initargs)
        boot = _store(start, tag, owner, read_only=False, what=lambda _: "initializer/initargs") \
            if initializer is not None else None
    except BaseException:
        _shm.sweep(owner, tag)
        raise
    return Published(tag, shared, boot)


def _shared_name(values: Any) -> str:
    for name, value in values.items():
        try:
            _transport.dumps_plain(value)
        except Exception:
            return f"shared[{name!r}]"
    return "shared"


def _store(obj: object, tag: str, owner: int, *, read_only: bool,
           what: Callable[[Any], str]) -> str:
    try:
        blob = _transport.dumps(obj, threshold=SEGMENT_MIN_BYTES, owner=owner, creator=tag,
                                read_only=read_only)
    except Exception as exc:
        raise TypeError(f"{what(obj)} cannot be pickled to send it to the workers: "
                        f"{type(exc).__name__}: {exc}") from exc
    return _store_bytes(blob, owner=owner, creator=tag)


def _store_bytes(data: bytes, *, owner: int, creator: str) -> str:
    """Write ``data`` into a new segment named as ``_shm`` names them; return the name. Raises
    ``OSError`` if ``/dev/shm`` is full or missing, leaving nothing behind."""
    name = f"{_shm.PREFIX}{owner}-{creator}-{next(_files)}-{os.urandom(4).hex()}"
    path = os.path.join(_shm.SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view, done = memoryview(data), 0
        while done < len(data):  # one call unless the blob exceeds Linux's ~2 GiB per write
            done += os.pwrite(fd, view[done:], done)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return name


def _read_bytes(name: str) -> bytes:
    """A segment's contents; ``SegmentMissing`` if it is gone (its engine closed or died)."""
    try:
        with open(os.path.join(_shm.SHM_DIR, name), "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise _shm.SegmentMissing(name) from None


def withdraw(published: Published, *, owner: int) -> None:
    """Unlink every segment of ``published`` (workers that still map them keep their views)."""
    _shm.sweep(owner, published.tag)


# ---- the worker side ----------------------------------------------------------------------------


def attach(name: str) -> None:
    """In a worker, before the initializer: map the shared values (arrays read-only, pages
    faulted in only when read, so a worker that never reads a table costs it nothing). Raises
    ``RuntimeError`` saying so if they cannot be mapped (the engine is gone, say); the worker's
    items then fail with it, as when an initializer raises."""
    global _process_values
    try:
        values = _transport.loads(_read_bytes(name), unlink=False, lazy=True)
    except Exception as exc:
        raise RuntimeError(f"the engine's shared data could not be mapped in this worker: "
                           f"{type(exc).__name__}: {exc}") from exc
    _process_values = dict(cast(Mapping[str, Any], values))


def boot(name: str) -> tuple[Callable[..., object], tuple[Any, ...]]:
    """In a worker: the initializer and its arguments. Their big arrays are private
    copy-on-write views (the initializer may change them, as it could change its own copy);
    untouched, they cost no memory per worker."""
    start = cast(tuple[Any, Any], _transport.loads(_read_bytes(name), writable=True, unlink=False))
    return start[0], tuple(start[1])


# ---- looking values up --------------------------------------------------------------------------

_process_values: dict[str, Any] | None = None  # a worker's, set by attach()
# In-process backends (serial): the values of the engine whose item runs in this thread.
_serving: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "stagepool_shared", default=None)


def shared(name: str) -> Any:
    """The value the engine was given as ``shared={name: value}``, inside one of its tasks (or
    its initializer). numpy arrays are read-only views of memory every worker maps once; other
    values were pickled once and unpickled once per worker: treat them as read-only too.

    Raises ``LookupError`` naming the known names if ``name`` is not one of them, or if called
    outside a task of an engine created with ``shared=``.
    """
    values = _serving.get()
    if values is None:
        values = _process_values
    if values is None:  # a thread the task started (threads do not inherit the context)
        values = _only_serving(name)
    try:
        return values[name]
    except KeyError:
        raise LookupError(f"stagepool.shared({name!r}): no shared value has that name; the "
                          f"engine has {sorted(values)}") from None


def freeze(values: Mapping[str, Any]) -> dict[str, Any]:
    """For an in-process backend: a copy made through the same pickle as for workers, so that its
    arrays are read-only and an unpicklable value fails at construction on every backend."""
    if not values:
        return {}
    try:
        blob = _transport.dumps(dict(values), threshold=0, owner=os.getpid(), creator="p",
                                read_only=True)
    except Exception as exc:
        raise TypeError(f"{_shared_name(values)} cannot be pickled to send it to the workers: "
                        f"{type(exc).__name__}: {exc}") from exc
    return dict(cast(Mapping[str, Any], _transport.loads(blob, unlink=False)))


# Every in-process engine running a task now, its values by id (with how many of its tasks run):
# what a thread started by a task finds, as a worker's threads find its _process_values.
_in_process: dict[int, tuple[Mapping[str, Any], int]] = {}
_in_process_lock = threading.Lock()


@contextlib.contextmanager
def serving(values: Mapping[str, Any] | None) -> Iterator[None]:
    """Make ``values`` what :func:`shared` finds in this thread (and context) meanwhile, and in
    threads the task starts, while no other in-process engine with other values runs a task."""
    token = _serving.set(values)
    _enter(values)
    try:
        yield
    finally:
        _leave(values)
        _serving.reset(token)


def _enter(values: Mapping[str, Any] | None) -> None:
    if values:  # an engine without shared values has nothing to find
        with _in_process_lock:
            _in_process[id(values)] = (values, _in_process.get(id(values), (values, 0))[1] + 1)


def _leave(values: Mapping[str, Any] | None) -> None:
    if values:  # an engine without shared values has nothing to find
        with _in_process_lock:
            count = _in_process[id(values)][1] - 1
            if count:
                _in_process[id(values)] = (values, count)
            else:
                del _in_process[id(values)]


def _only_serving(name: str) -> Mapping[str, Any]:
    """The values of the one in-process engine running a task now; LookupError if none, or if
    several are (this thread's context cannot say whose task started it)."""
    with _in_process_lock:
        running = [values for values, _ in _in_process.values()]
    if len(running) == 1:
        return running[0]
    if not running:
        raise LookupError(f"stagepool.shared({name!r}) is for the tasks of an Engine created "
                          "with shared={...}; none is running this code")
    raise LookupError(f"stagepool.shared({name!r}) from a thread a task started, while "
                      f"{len(running)} in-process engines run tasks: which one's is ambiguous; "
                      "read the value in the task and pass it to the thread")
