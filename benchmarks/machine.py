"""Facts about the machine a run happened on, recorded beside the numbers."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import platform
import sys
from typing import Any

__all__ = ["machine_facts", "one_line"]

PACKAGES = ("stagepool", "numpy", "loky", "cloudpickle", "psutil", "joblib", "mpire", "pebble",
            "dask", "distributed", "matplotlib")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """CPUs, affinity, memory, load, interpreter, package versions and stagepool's own plan."""
    import psutil

    import stagepool as sp

    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "cpus": os.cpu_count(),
        "affinity": affinity,
        "memory_total_bytes": psutil.virtual_memory().total,
        "loadavg_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "mp_default_start_method": multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_context().get_start_method(),
        "versions": {name: _version(name) for name in PACKAGES},
        "stagepool_plan": sp.plan_workers().reason,
    }


def one_line(facts: dict[str, Any]) -> str:
    v = facts["versions"]
    return (f"{facts['cpus']} cpus (affinity {facts['affinity']}), python {facts['python']}, "
            f"numpy {v['numpy']}, load {facts['loadavg_start'][0]:.2f}; "
            f"stagepool plan: {facts['stagepool_plan']}")
