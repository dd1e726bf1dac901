"""Identities a checkpoint compares across runs: which function wrote it, and what an item was.

* :func:`describe_callable`: the function's qualified name and a digest of its code (bytecode,
  constants and names, recursively; not line numbers or file names, so editing another part of
  the file does not invalidate a checkpoint, while editing the function does).
* :func:`content_digest`: a digest of an item's pickled content, the default item key with its
  index. numpy arrays (any pickle-5 buffer) are hashed in place, without a copy.

Both are pure and cheap; neither imports numpy.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import types
from typing import Any

__all__ = ["content_digest", "describe_callable"]


def describe_callable(fn: Any) -> str:
    """``"module.qualname#digest"`` for a function, a bound method, a ``functools.partial``
    (its function and arguments) or a callable object (its class and ``__call__``)."""
    if isinstance(fn, functools.partial):
        args = _digest_of_pickle((fn.args, fn.keywords))
        return f"partial({describe_callable(fn.func)}, args#{args})"
    target = getattr(fn, "__func__", fn)  # a bound method: its function
    if not hasattr(target, "__code__") and not isinstance(target, types.BuiltinFunctionType):
        target = type(fn).__call__  # a callable object: its class's method
        name = _qualified(type(fn))
    else:
        name = _qualified(target)
    code = getattr(target, "__code__", None)
    return f"{name}#{_code_digest(code)}" if isinstance(code, types.CodeType) else name


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _code_digest(code: types.CodeType) -> str:
    h = hashlib.sha256()
    _feed_code(h, code)
    return h.hexdigest()[:16]


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)  # a nested function or comprehension: its code, not its address
        else:
            h.update(repr(const).encode())


def _digest_of_pickle(obj: Any) -> str:
    try:
        return content_digest(obj).hex()
    except Exception:  # unpicklable arguments: their types are all that can be compared
        return repr(type(obj))


def content_digest(item: Any) -> bytes:
    """16 bytes identifying the item's pickled content (pickle protocol 5; out-of-band buffers
    such as numpy arrays hashed in place). Raises what pickling raises."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(item, protocol=5, buffer_callback=buffers.append)
    h = hashlib.sha256(head)
    for buffer in buffers:
        h.update(buffer.raw())
    return h.digest()[:16]
