"""Targets for the command line: the stage as ``MODULE:FUNCTION``, and its sample from a factory.

``stagepool profile MODULE:FUNCTION --items MODULE:FACTORY`` imports both and takes the first
``--sample`` items the factory produces. Whatever goes wrong (a typo, a module that raises on
import, a factory that raises or returns nothing) is a ``TargetError`` whose message fits a
command line: the CLI prints it and exits 2, with no traceback.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from typing import Any

from .._config import check_positive_int

__all__ = ["TargetError", "resolve_target", "sample_from_factory"]


class TargetError(ValueError):
    """A ``MODULE:NAME`` target that cannot be used; the message says why and what to check."""


def resolve_target(spec: str, *, what: str = "stage") -> Callable[..., Any]:
    """Import ``MODULE:NAME`` (NAME may be dotted) and return it; it must be callable.

    Raises :class:`TargetError` (a ``ValueError``) with a message fit for a command line: a bad
    format, no such module, a module that raises on import, no such attribute, not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"the {what} must look like MODULE:NAME "
                          f"(e.g. stagepool.demo:process_segment), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise TargetError(f"the {what} {spec!r}: no module named {exc.name!r}; check the "
                              "spelling, and that it is importable from the current directory "
                              "or PYTHONPATH") from None
        raise TargetError(f"the {what} {spec!r}: importing {module_name!r} failed: "
                          f"{exc}") from None
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {what} {spec!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"the {what} {spec!r}: module {module_name!r} has no attribute "
                              f"{attr!r}") from None
    if not callable(obj):
        raise TargetError(f"the {what} {spec!r} is not callable: it is a {type(obj).__name__}")
    return obj  # type: ignore[no-any-return]


def sample_from_factory(factory: Callable[[], Any], count: int, *, name: str = "items factory",
                        ) -> list[Any]:
    """Call ``factory()`` and take the first ``count`` items of what it returns.

    Raises :class:`TargetError` when the factory raises (while called or while iterated), returns
    something that is not iterable, or produces no item.
    """
    check_positive_int(count, "sample")
    try:
        produced = factory()
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {name} raised {type(exc).__name__}: {exc}") from None
    try:
        iterator = iter(produced)
    except TypeError:
        raise TargetError(f"the {name} returned a {type(produced).__name__}, which is not "
                          "iterable; it must return an iterable of items") from None
    try:
        items = list(itertools.islice(iterator, count))
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {name} raised {type(exc).__name__} while producing items: "
                          f"{exc}") from None
    if not items:
        raise TargetError(f"the {name} produced no items")
    return items
