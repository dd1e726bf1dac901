"""The C loops of the hot paths (``_tinyloop.c``), when the install could build them.

``pip install -e .`` compiles ``stagepool._tinyloop`` where a C compiler is; without one the
install goes on, ``tinyloop`` is None here, and the callers run the same loops in Python
(``_worker_loop._loop``, ``_reading.read_within``): slower on tiny items, the same results.

Imported by name: import-linter reads Python sources only, and took ``from . import
_tinyloop`` for an import of the whole package (a cycle through every layer).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["tinyloop"]


def _load() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__package__}._tinyloop")
    except ImportError:  # pragma: no cover - installed without a compiler
        return None


tinyloop = _load()
