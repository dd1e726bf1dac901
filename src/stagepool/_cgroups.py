"""The CPU and memory limits a container puts on this process: cgroup v1 and v2 files, read as
plain text (pure functions of a proc root and a cgroup root, so tests give them fake trees).

Limits set on a parent cgroup count: the reader walks from the process's cgroup up to the mount
root and keeps the tightest CPU quota and the memory level with the least headroom. An absent or
unreadable file means "no limit"; nothing here raises for an odd cgroup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._config import MAX_BYTES

__all__ = ["CgroupLimits", "read_cgroup"]

_UNLIMITED_BYTES = MAX_BYTES
_DEFAULT_CFS_PERIOD_US = 100_000

# --------------------------------------------------------------------------------------------------
# Reading cgroups (v1 and v2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    version: int | None = None
    cpu_quota: float | None = None
    mem_limit: int | None = None
    mem_usage: int | None = None
    # Page cache the kernel reclaims before it kills anyone (``inactive_file`` of this
    # process's cgroup): not pressure. A media job that reads files fills the cache up to the
    # limit, so usage alone would look like pressure all the time.
    mem_reclaimable: int | None = None


def read_cgroup(proc_root: Path, cgroup_root: Path) -> CgroupLimits:
    """Find this process's cgroups in ``{proc_root}/self/cgroup`` and read their effective limits.

    A limit set on any ancestor binds the process as much as one on its own cgroup (a job in a
    child of a 1.5 GiB slice has 1.5 GiB), so each controller is read from the process's cgroup
    up to the mount root: the smallest CPU quota, and the memory level with the least headroom.
    """
    text = _read_text(proc_root / "self" / "cgroup")
    if text is None:
        return CgroupLimits()
    v1_paths: dict[str, tuple[str, str]] = {}  # controller -> (hierarchy dir name, cgroup path)
    v2_path: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2_path = path
        for controller in controllers.split(","):
            if controller in ("cpu", "memory"):
                v1_paths[controller] = (controllers, path)
    # Hybrid hosts list both v1 controllers and an empty "0::/" line; the limits then live in v1.
    if v1_paths:
        return _read_cgroup_v1(cgroup_root, v1_paths)
    if v2_path is not None:
        return _read_cgroup_v2(_cgroup_levels(cgroup_root, v2_path))
    return CgroupLimits()


def _cgroup_levels(root: Path, path: str) -> list[Path]:
    """The directory of cgroup ``path`` under the mount ``root`` and its ancestors, leaf first,
    ending with ``root``.

    Only ``[root]`` when that directory is absent: inside a container, /proc/self/cgroup shows the
    host-side path while the container's own cgroup is mounted at the root (its ancestors are not
    visible; cgroup v1's ``hierarchical_memory_limit`` still accounts for them).
    """
    parts = PurePosixPath(path).relative_to("/").parts if path.startswith("/") else ()
    if not parts or ".." in parts or not root.joinpath(*parts).is_dir():
        return [root]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_cgroup_v2(levels: list[Path]) -> CgroupLimits:
    leaf_usage = _read_int(levels[0] / "memory.current")
    limit, usage = _tightest_memory(
        leaf_usage,
        [(_read_int(d / "memory.max"), _read_int(d / "memory.current")) for d in levels],
    )
    return CgroupLimits(
        version=2,
        cpu_quota=_smallest(_parse_cpu_max(_read_text(d / "cpu.max")) for d in levels),
        mem_limit=limit,
        mem_usage=usage,
        mem_reclaimable=_stat_value(levels[0], "inactive_file"),
    )


def _read_cgroup_v1(root: Path, paths: Mapping[str, tuple[str, str]]) -> CgroupLimits:
    cpu_quota = mem_limit = mem_usage = None
    if "cpu" in paths:
        controllers, path = paths["cpu"]
        # The mount point is named after the co-mounted controllers; "cpu" is usually a symlink.
        for name in dict.fromkeys((controllers, "cpu,cpuacct", "cpu")):
            if (root / name).is_dir():
                cpu_quota = _smallest(
                    _cpu_quota(_read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us"))
                    for d in _cgroup_levels(root / name, path)
                )
                break
    if "memory" in paths:
        levels = _cgroup_levels(root / "memory", paths["memory"][1])
        leaf_usage = _read_int(levels[0] / "memory.usage_in_bytes")
        candidates = [(_read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes"))
                      for d in levels]
        # The kernel's own minimum over every ancestor, including those outside our view.
        candidates.append((_v1_hierarchical_limit(levels[0]), leaf_usage))
        mem_limit, mem_usage = _tightest_memory(leaf_usage, candidates)
        reclaimable = _stat_value(levels[0], "total_inactive_file")
        return CgroupLimits(1, cpu_quota, mem_limit, mem_usage, reclaimable)
    return CgroupLimits(1, cpu_quota, mem_limit, mem_usage)


def _v1_hierarchical_limit(directory: Path) -> int | None:
    """``hierarchical_memory_limit`` from a v1 ``memory.stat``: the smallest limit on the path."""
    return _stat_value(directory, "hierarchical_memory_limit")


def _stat_value(directory: Path, name: str) -> int | None:
    """One field of a ``memory.stat`` file, None when absent or not an integer."""
    for line in (_read_text(directory / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _tightest_memory(
    leaf_usage: int | None, levels: Iterable[tuple[int | None, int | None]]
) -> tuple[int | None, int | None]:
    """The (limit, usage) of the level with the least headroom; (None, leaf usage) if none has a
    limit.

    The least headroom, not the lowest limit: a parent's higher limit binds first when its other
    children use most of it. A level whose usage is unknown is charged the leaf's usage, which
    its own usage includes.
    """
    limited = [(limit, leaf_usage if usage is None else usage)
               for limit, usage in levels if _limit_or_none(limit) is not None]
    if not limited:
        return None, leaf_usage
    return min(limited, key=lambda level: (level[0] or 0) - (level[1] or 0))  # first of ties: leaf


def _smallest(values: Iterable[float | None]) -> float | None:
    """The smallest known value (a CPU quota), or None when no level sets one."""
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") as a number of CPUs."""
    if text is None:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else _DEFAULT_CFS_PERIOD_US
    except ValueError:
        return None
    return _cpu_quota(quota, period)


def _cpu_quota(quota: int | None, period: int | None) -> float | None:
    """quota / period in CPUs; None when unlimited (v1 writes -1) or unknown."""
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _limit_or_none(limit: int | None) -> int | None:
    return None if limit is None or limit >= _UNLIMITED_BYTES else limit


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    """An integer file; None when missing, unreadable or not an integer ("max" reads as None)."""
    text = _read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
