"""``profile.json``: the Engine settings ``stagepool profile --out DIR`` recommends, read back.

The profiler writes the file (``StageProfile.config``); ``Engine.from_profile`` and
``stagepool.load_profile`` read it. Reading lives here, at the configuration layer, so the engine
never imports the profiler (which sits above it and imports the engine).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._config import check_positive_int, check_timeout, positive_size, validate_chunk_size

__all__ = ["ENGINE_KEYS", "PROFILE_FORMAT", "load_profile"]

PROFILE_FORMAT = "stagepool-profile/1"
ENGINE_KEYS = ("workers", "chunk_size", "mem_per_task", "timeout")


def load_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recommended ``Engine`` keyword arguments saved by ``stagepool profile --out DIR``.

    ``path`` is the ``profile.json`` file or the directory holding it. The result is validated
    here and ready for ``Engine(**load_profile(path))``. Raises ``FileNotFoundError`` when there is
    no such file and ``ValueError`` (naming the file and the key) when it is not a valid profile.
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
    return _check_engine_kwargs(rec, str(file))


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
