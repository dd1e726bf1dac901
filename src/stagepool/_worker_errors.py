"""How a worker packs an item's exception for the parent: a pickle that can be rebuilt there, or
a description when it cannot (``ErrInfo``). Runs in workers: imports nothing heavy."""

from __future__ import annotations

import pickle
import traceback
from types import TracebackType
from typing import NamedTuple

from . import _transport
from ._remote_types import qualified_name as _type_name
from ._remote_types import stand_in

__all__ = ["ErrInfo", "exc_info", "explain_read_only", "safe_str", "unpicklable"]


class ErrInfo(NamedTuple):
    """An item's failure as a worker packs it for the parent."""

    kind: str  # "error", "serialization" or "unpickle" (an argument failed to unpickle here)
    blob: bytes | None  # the pickled exception, or None when it cannot be pickled and rebuilt
    type_name: str
    message: str
    traceback: str  # formatted in the worker


# The modules of the worker's item loops (run_chunk, apply_call, ...): their frames lead every
# item's traceback, and say nothing about the item.
_LOOPS = frozenset({"stagepool._worker", "stagepool._worker_loop"})


def exc_info(kind: str, exc: BaseException) -> ErrInfo:
    """Pack an exception so that the parent can rebuild it, or at least describe it. Its
    formatted traceback starts at the item's own code (the worker's loop frames left out)."""
    tb = "".join(traceback.format_exception(type(exc), exc, _from_item(exc.__traceback__)))
    blob: bytes | None
    try:
        blob = _transport.dumps_plain(exc)
        pickle.loads(blob)  # an exception whose __init__ cannot be replayed fails here, not later
    except BaseException:  # a RemoteError naming its classes instead: retry_on still matches
        blob = stand_in(exc, safe_str(exc), tb)
    return ErrInfo(kind, blob, _type_name(exc), safe_str(exc), tb)


def _from_item(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the first frame that is not the worker's item loop (its last frame at least:
    an error raised by the loop itself keeps where it was raised)."""
    while tb is not None and tb.tb_next is not None and \
            tb.tb_frame.f_globals.get("__name__") in _LOOPS:
        tb = tb.tb_next
    return tb


def unpicklable(what: str, value: object, exc: BaseException) -> ErrInfo:
    """The "serialization" failure of ``value`` (``what``: "the result", "the value of stage
    'x'"), which pickling refused with ``exc``."""
    msg = (f"{what} ({_type_name(value)}) cannot be pickled to send it back: "
           f"{type(exc).__name__}: {safe_str(exc)}")
    return ErrInfo("serialization", None, "SerializationError", msg,
                   "".join(traceback.format_exception(exc)))


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__name__}: str() failed>"


def explain_read_only(exc: BaseException) -> None:
    """numpy's "assignment destination is read-only" / "output array is read-only" alone does
    not say why a function that works on small test arrays fails on big ones in the pool."""
    if isinstance(exc, ValueError) and "read-only" in safe_str(exc):
        exc.add_note(
            "stagepool: numpy arrays arrive in workers read-only, at every size (from "
            "shm_threshold, default 1 MiB, up as views of shared memory). To change an input in "
            "place, create the Engine with writable_inputs=True (private writable copies), or "
            "work on a.copy().")
