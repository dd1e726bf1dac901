"""``profile.json``: the Engine settings ``stagepool profile --out DIR`` recommends, read back.

The profiler writes the file (``StageProfile.config``); ``Engine.from_profile`` and
``stagepool.load_profile`` read it. Reading lives here, at the configuration layer, so the engine
never imports the profiler (which sits above it and imports the engine).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._config import check_positive_int, check_timeout, positive_size, validate_chunk_size

__all__ = ["ENGINE_KEYS", "PROFILE_FORMAT", "CostTimeout", "load_profile"]

PROFILE_FORMAT = "stagepool-profile/1"
ENGINE_KEYS = ("workers", "chunk_size", "mem_per_task", "timeout")


class CostTimeout:
    """A per-item timeout that grows with the item: ``floor + per_cost x cost(item)`` seconds
    (what ``profile_stage(cost=...)`` recommends). Called by the engine in the parent, once per
    item; an exception from ``cost`` fails that item, naming the timeout as the cause."""

    def __init__(self, floor: float, per_cost: float, cost: Callable[[Any], float]) -> None:
        self.floor, self.per_cost, self.cost = floor, per_cost, cost

    def __call__(self, item: Any) -> float:
        return self.floor + self.per_cost * max(0.0, float(self.cost(item)))

    def __repr__(self) -> str:
        name = getattr(self.cost, "__qualname__", repr(self.cost))
        return f"CostTimeout({self.floor:g} s + {self.per_cost:.3g} s x {name}(item))"


def load_profile(path: str | os.PathLike[str], *,
                 cost: Callable[[Any], float] | None = None) -> dict[str, Any]:
    """The recommended ``Engine`` keyword arguments saved by ``stagepool profile --out DIR``.

    ``path`` is the ``profile.json`` file or the directory holding it. The result is validated
    here and ready for ``Engine(**load_profile(path))``. With ``cost`` (the callable the profile
    was made with, ``profile_stage(cost=...)``), ``timeout`` is the profile's cost-scaled rule, a
    :class:`CostTimeout`, instead of one number for every item. Raises ``FileNotFoundError`` when
    there is no such file and ``ValueError`` (naming the file and the key) when it is not a valid
    profile, or when ``cost`` is given and the profile has no cost-scaled timeout.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "profile.json"
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no stagepool profile at {file}; write one with "
            "`stagepool profile MODULE:FUNCTION --items MODULE:FACTORY --out DIR`") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not a stagepool profile: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{file} is not a stagepool profile: expected \"format\": "
                         f"\"{PROFILE_FORMAT}\"")
    rec = data.get("recommended")
    if not isinstance(rec, dict):
        raise ValueError(f"{file}: \"recommended\" must be an object of Engine arguments")
    kwargs = _check_engine_kwargs(rec, str(file))
    if cost is not None:
        kwargs["timeout"] = _cost_timeout(data.get("timeout_per_cost"), cost, str(file))
    return kwargs


def _cost_timeout(rule: Any, cost: Callable[[Any], float], where: str) -> CostTimeout:
    if not callable(cost):
        raise TypeError(f"cost must be a callable of the item, not {type(cost).__name__}")
    if rule is None:
        raise ValueError(f"{where} has no cost-scaled timeout (\"timeout_per_cost\"): profile "
                         "the stage with profile_stage(..., cost=...) to get one, or drop cost=")
    try:
        floor, per_cost = float(rule["floor"]), float(rule["per_cost"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{where}: \"timeout_per_cost\" must be {{\"floor\": seconds, "
                         f"\"per_cost\": seconds}}, not {rule!r}") from None
    if not (math.isfinite(floor) and math.isfinite(per_cost) and floor > 0 and per_cost >= 0):
        raise ValueError(f"{where}: \"timeout_per_cost\" needs floor > 0 and per_cost >= 0, "
                         f"got {rule!r}")
    return CostTimeout(floor, per_cost, cost)


def _check_engine_kwargs(rec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``rec`` as Engine would take it, checked here so that a bad file is named as the cause;
    raises ``ValueError`` naming ``where`` and the argument."""
    unknown = sorted(set(rec) - set(ENGINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown Engine arguments {unknown}; expected some of "
                         f"{list(ENGINE_KEYS)}")
    try:
        if "workers" in rec and rec["workers"] != "auto":
            check_positive_int(rec["workers"], "workers")
        if "chunk_size" in rec:
            validate_chunk_size(rec["chunk_size"])
        if rec.get("mem_per_task") is not None:
            positive_size(rec["mem_per_task"], "mem_per_task")
        if callable(rec.get("timeout")):
            raise TypeError("timeout must be seconds (a number) or None")
        check_timeout(rec.get("timeout"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return dict(rec)
