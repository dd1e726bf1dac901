"""A fast pickle for the common single call: ``submit(fn, 5)`` with ``fn`` importable by name.

cloudpickle's pickler costs ~15 us to set up and consults a Python ``reducer_override`` for every
non-scalar object; the C pickler writes a call made only of builtin scalars, tuples, lists, dicts
and functions pickled by reference in ~4 us, and its bytes are the same that cloudpickle would
write (cloudpickle differs only for what it pickles by value: lambdas, closures, ``__main__``
code, modules registered by value, classes, arrays). That per-call saving was a third of the
caller's cost of a ``submit``.

Anything this module is not sure of goes the usual way (``None``): never a different pickle.
"""

from __future__ import annotations

import pickle
import sys
import types
from typing import Any

from .. import _transport
from .._shm import HEADER, MAGIC
from .._worker import dumps

__all__ = ["MAX_LENGTH", "PlainPickler"]

_EMPTY_HEADER = HEADER.pack(MAGIC, 0)  # "no shared-memory segment": what the readers expect
# Types the C pickler writes without ever asking a reducer (so cloudpickle writes them alike).
_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})
# Containers deeper or longer than this go the usual way: checking them would cost more than
# cloudpickle's set-up saves.
MAX_DEPTH = 4
MAX_LENGTH = 16
# Functions remembered as pickled by reference (or not); past this the table starts afresh.
MAX_FUNCTIONS = 256


class PlainPickler:
    """Decides per object whether the C pickler may write it; remembers the verdict per function
    (functions found by name are module-level: keeping them referenced keeps nothing alive)."""

    def __init__(self) -> None:
        self._functions: dict[Any, bool] = {}

    def dumps(self, obj: object) -> bytes | None:
        """``obj`` pickled with a segment-free header (as ``_transport.dumps`` writes it), or
        None when only cloudpickle can be trusted with it."""
        if not self._plain(obj, MAX_DEPTH):
            return None
        try:
            return _EMPTY_HEADER + pickle.dumps(obj, _transport.PICKLE_PROTOCOL)
        except Exception:  # e.g. a recursion limit: let the usual path say what is wrong
            return None

    def function(self, fn: Any) -> bytes | None:
        """``fn`` pickled bare (no header: a worker's function cache reads it), when it is a
        function found by name; else None. ~2 us against cloudpickle's ~10, paid per call."""
        if type(fn) is not types.FunctionType or not self._plain(fn, 0):
            return None
        try:
            return pickle.dumps(fn, _transport.PICKLE_PROTOCOL)
        except Exception:
            return None

    def _plain(self, obj: Any, depth: int) -> bool:
        # Loops rather than all(generator), scalars checked inline: this runs on every submit.
        kind = type(obj)
        if kind in _SCALARS:
            return True
        if kind is types.FunctionType or (  # a module's builtin (math.sqrt), not a bound method
                kind is types.BuiltinFunctionType and type(obj.__self__) is types.ModuleType):
            return self._by_reference(obj)
        if depth == 0 or not (kind is tuple or kind is list or kind is dict) or len(obj) > MAX_LENGTH:
            return False
        if kind is dict:
            for key in obj:
                if type(key) is not str:
                    return False
            obj = obj.values()
        for x in obj:  # noqa: SIM110  # a loop: all(generator) cost twice as much here
            if type(x) not in _SCALARS and not self._plain(x, depth - 1):
                return False
        return True

    def _by_reference(self, fn: Any) -> bool:
        known = self._functions.get(fn)
        if known is None:
            if not _found_by_name(fn):
                return False
            known = _same_pickle(fn)
            if len(self._functions) >= MAX_FUNCTIONS:
                self._functions.clear()
            self._functions[fn] = known
        return known


def _found_by_name(fn: Any) -> bool:
    """A module-level function its module still holds under its name (no lambda, closure or
    ``__main__`` code, which a worker could not find by name). Checked before anything is
    remembered, so a closure is never kept alive by the table."""
    module = sys.modules.get(fn.__module__ or "")
    if module is None or fn.__module__ == "__main__":
        return False
    found: Any = module
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is fn


def _same_pickle(fn: Any) -> bool:
    """cloudpickle pickles it by reference too (not registered by value, say)."""
    try:
        return pickle.dumps(fn, _transport.PICKLE_PROTOCOL) == dumps(fn)
    except Exception:
        return False
