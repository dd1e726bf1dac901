"""Modules imported at their first use, so that ``import stagepool`` stays cheap.

``psutil`` (~15 ms) is needed once an Engine is built, ``asyncio`` (~40% of importing the
Engine class) only by the async calls: a script that never awaits must not pay for it. The
module's own global is replaced at the first attribute access, so later uses cost nothing.
Type checkers see the real import (``if TYPE_CHECKING: import psutil``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LazyModule"]


class LazyModule:
    """Stands in for ``name`` in ``namespace`` (a module's ``globals()``) until first used."""

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        self._name, self._namespace = name, namespace

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        self._namespace[self._name] = module  # later uses go straight to the module
        return getattr(module, attr)
