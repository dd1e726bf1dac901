"""In a worker: one globals dict for every function of the caller's ``__main__``.

cloudpickle sends a script's functions by value, each pickle with its own fresh globals dict. In
a worker, the initializer (one pickle) and the task (another) would then see different globals:
``def init(): global MODEL; MODEL = load()`` and ``def task(x): return MODEL(x)`` raised
``NameError`` in every task, where a forked ``multiprocessing.Pool`` (whose workers share the
real ``__main__``) works. Installed once per worker process, this routes every by-value
function of the caller's ``__main__`` (tasks, initializer, helpers they call, methods of
``__main__`` classes) to one dict, as a forked worker's ``__main__`` would be.

Which value wins when a function arrives carrying globals: a name the worker's own code set (the
initializer's ``MODEL``, even where the script had ``MODEL = None`` at module level) keeps the
worker's value, as in a forked worker; a name whose value came from an earlier pickle takes the
newer pickle's (a notebook that redefined a helper sends the new one).

Failure: if cloudpickle's reconstruction functions are not where this expects them (another
cloudpickle version), nothing is installed and each function keeps its own globals, as before.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["install"]

_MISSING = object()
_globals: dict[str, Any] = {}  # the caller's __main__, as this worker sees it
_pickled: dict[str, Any] = {}  # the value each name last got from a pickle (not worker code)


def install() -> bool:
    """Route the caller's ``__main__`` functions unpickled from now on in this process to one
    globals dict; returns False (and changes nothing) where cloudpickle is not as expected."""
    try:
        from cloudpickle import cloudpickle as module
    except ImportError:  # pragma: no cover - a dependency of loky
        return False
    make, setstate = (getattr(module, name, None) for name in ("_make_function",
                                                                "_function_setstate"))
    if not (callable(make) and callable(setstate)):
        return False
    if getattr(make, "__wrapped__", None) is None:  # not twice (a worker may start a worker)
        module._make_function = _named_like(make, functools.partial(_make_function, make))
        module._function_setstate = _named_like(setstate,
                                                functools.partial(_function_setstate, setstate))
    return True


def _named_like(original: Callable[..., Any], wrapper: functools.partial[Any]) -> Callable[..., Any]:
    """``wrapper`` under the original's name: a function this worker pickles (a result holding
    a lambda) still refers to cloudpickle's function, which the parent resolves to its own."""

    def named(*args: Any) -> Any:
        return wrapper(*args)

    functools.update_wrapper(named, original)
    return named


def _make_function(make: Callable[..., Any], code: Any, base_globals: dict[str, Any],
                   *rest: Any) -> Any:
    if base_globals.get("__name__") == "__main__" and base_globals is not _real_main():
        for name, value in base_globals.items():  # __name__, __file__, ...: the first ones stay
            _globals.setdefault(name, value)
        base_globals = _globals
    return make(code, base_globals, *rest)


def _function_setstate(setstate: Callable[..., Any], obj: Any, state: Any) -> Any:
    if getattr(obj, "__globals__", None) is _globals:
        attrs, slots = state
        _merge(slots.pop("__globals__"))
        state = (attrs, {**slots, "__globals__": {}})
    return setstate(obj, state)


def _merge(incoming: dict[str, Any]) -> None:
    """Names the worker's code set keep their value; names from a pickle take the newer one."""
    for name, value in incoming.items():
        current = _globals.get(name, _MISSING)
        if current is _MISSING or current is _pickled.get(name, _MISSING):
            _globals[name] = _pickled[name] = value
        else:  # set by code here: the worker's from now on, so forget the pickled value
            _pickled.pop(name, None)


def _real_main() -> dict[str, Any] | None:
    main = sys.modules.get("__main__")
    return None if main is None else main.__dict__
