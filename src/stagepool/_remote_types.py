"""What the parent knows of an exception's classes when the exception itself cannot travel.

An exception whose class cannot be rebuilt in the parent (``class E(Exception): def
__init__(self, a, b)``, or one holding a lock) arrives as a ``RemoteError``. ``retry_on=(E,)``
must still match it, so the worker records the qualified names of the classes it is an
instance of (its MRO) in the stand-in it sends instead, and ``retry_on`` compares names.
"""

from __future__ import annotations

import pickle

from ._errors import RemoteError

__all__ = ["names_match", "qualified_name", "remote_error", "stand_in"]


def qualified_name(obj: object) -> str:
    """``module.Qualname`` of a class (of an object's class), the bare name for builtins."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__name__


def remote_error(type_name: str, message: str, traceback: str,
                 type_names: tuple[str, ...] = ()) -> RemoteError:
    """The stand-in for an exception that could not be rebuilt (in the worker or the parent)."""
    return RemoteError(f"{type_name}: {message}", type_name=type_name,
                       remote_traceback=traceback, type_names=type_names)


def stand_in(exc: BaseException, message: str, traceback: str) -> bytes | None:
    """In the worker: a pickled RemoteError naming ``exc``'s classes; None if even that fails
    (the parent then builds one without the names)."""
    names = tuple(qualified_name(cls) for cls in type(exc).__mro__)
    try:
        return pickle.dumps(remote_error(names[0], message, traceback, names))
    except Exception:  # a class whose name cannot be read: the parent's plainer stand-in
        return None


def names_match(entry: type[BaseException], error: BaseException | None) -> bool:
    """Whether a ``retry_on`` class is among those the worker recorded for a RemoteError."""
    return isinstance(error, RemoteError) and qualified_name(entry) in error.type_names
