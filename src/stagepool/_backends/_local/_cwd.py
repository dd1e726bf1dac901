"""Starting workers with loky after this process's working directory was deleted.

A worker starts in its parent's working directory. Forked from the template, it simply inherits
it, deleted or not (Linux runs a process in a deleted directory). loky's fork+exec (used where
the template cannot serve, or after it died) asks ``os.getcwd()`` for the path the child should
``chdir`` to, which raises ``FileNotFoundError`` once the directory is gone: every respawn then
failed, and the engine closed with its pending items cancelled. ``/proc/<pid>/cwd`` reaches the
deleted directory while this process is in it, so the child is given that path instead.

A fresh interpreter also makes each relative ``PYTHONPATH`` entry absolute at start-up, from its
working directory: in a deleted one it cannot ("failed to make path absolute") and dies before
any code of ours runs. So workers get the ``PYTHONPATH`` the engine's process had when the engine
was made, its entries absolute (``with_absolute_pythonpath``).
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping

__all__ = ["DeletedCwdOs", "with_absolute_pythonpath", "workers_directory"]


# The working directory at the last worker start that could read it: what an error names once
# it is gone (Engine() refuses a deleted one, so the first start always sees it).
_last_seen = ["the working directory"]


def workers_directory(proc: str = "/proc") -> str:
    """Where a worker started now should run: this process's working directory, or, when it was
    deleted, ``/proc/<pid>/cwd`` (the same directory, reachable while we are in it).

    Raises ``FileNotFoundError`` naming the deleted directory where there is no such path (no
    ``proc`` file system): no worker can start in it then."""
    try:
        _last_seen[0] = os.getcwd()
        return _last_seen[0]
    except FileNotFoundError:
        here = f"{proc}/{os.getpid()}/cwd"
        if os.path.isdir(here):
            return here
        raise FileNotFoundError(
            f"{_last_seen[0]} (this process's working directory) was deleted while the engine "
            "ran; a new worker cannot start in it here (no /proc): os.chdir() to an existing "
            "directory") from None


def with_absolute_pythonpath(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` (what a worker's environment adds to ours) plus, unless it sets its own, our
    ``PYTHONPATH`` with its relative entries made absolute from the working directory now (the
    same directories the workers would find from here; see the module docstring)."""
    out = dict(env)
    path = os.environ.get("PYTHONPATH")
    if path and "PYTHONPATH" not in out:
        out["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(entry) if entry else entry for entry in path.split(os.pathsep))
    return out


class DeletedCwdOs(types.ModuleType):
    """The ``os`` module, except that ``getcwd()`` is :func:`workers_directory`: what loky's
    ``spawn`` module sees as ``os`` (see the module docstring). Identical to ``os`` whenever the
    working directory exists, so other users of loky in this process see no difference."""

    def __init__(self) -> None:
        super().__init__("os", os.__doc__)

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def getcwd() -> str:
        return workers_directory()
