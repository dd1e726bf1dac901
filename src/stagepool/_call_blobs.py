"""Both ends of a bundle of single calls (see ``_backends/_local/_bundling``): each call keeps the
pickle its caller made, and a bundle's items are those pickles, so that merging calls pickles
nothing but bytes (the pool thread never runs user code). The worker unpickles each call as it
runs it, so a call that fails to unpickle fails alone."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, cast

from ._errors import SerializationError
from ._shm import HEADER, MAGIC
from ._transport import PICKLE_PROTOCOL, loads

__all__ = ["NO_SEGMENTS", "apply_blob", "pack_blobs"]

NO_SEGMENTS = HEADER.pack(MAGIC, 0)  # how a blob without shared-memory segments starts


def pack_blobs(blobs: list[bytes]) -> bytes:
    """A bundle's items: the calls' own pickles (each segment-free), as the worker reads items."""
    return NO_SEGMENTS + pickle.dumps(blobs, PICKLE_PROTOCOL)


def apply_blob(blob: bytes) -> object:
    """The item function of a bundle: unpickle one call (a one-item list of ``(fn, args,
    kwargs)``, as ``Engine.submit`` encodes it) and run it. Raises ``SerializationError`` when
    the call cannot be unpickled here, and whatever the function raises."""
    try:
        call: list[tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]] = cast(
            list[Any], loads(blob, unlink=False))
        [(fn, args, kwargs)] = call
    except Exception as exc:
        raise SerializationError(
            f"the call could not be unpickled in the worker: {type(exc).__name__}: {exc}",
            cause=exc) from exc
    return fn(*args, **kwargs)
