"""Tests for ``stagepool._resources``: cgroups on fake trees, pure planning, process helpers."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagepool._planning import (
    WorkerPlan,
    choose_workers,
    format_snapshot,
    overcommit_warning,
    plan_from_snapshot,
    plan_workers,
)
from stagepool._resources import (
    THREAD_ENV_VARS,
    ResourceSnapshot,
    kill_tree,
    process_tree_pids,
    read_machine_memory,
    rss_of,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 writes for "no limit" (2**63 page-aligned)


# --------------------------------------------------------------------------------------------------
# Fake /proc and /sys/fs/cgroup trees
# --------------------------------------------------------------------------------------------------


def make_tree(tmp_path: Path, proc_cgroup: str | None, files: dict[str, str]) -> tuple[Path, Path]:
    """Write ``{proc}/self/cgroup`` (unless None) and ``files`` under a fake cgroup root."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    root.mkdir()
    if proc_cgroup is not None:
        (proc / "self" / "cgroup").write_text(textwrap.dedent(proc_cgroup).lstrip())
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return proc, root


def read_fake(proc: Path, root: Path, **overrides: Any) -> ResourceSnapshot:
    """Read a fake tree with the machine-dependent values pinned, so results are deterministic."""
    kwargs: dict[str, Any] = {
        "environ": {},
        "logical_cpus": 8,
        "affinity_cpus": 8,
        "mem_total": 16 * GiB,
        "mem_available": 12 * GiB,
    }
    kwargs.update(overrides)
    return ResourceSnapshot.read(proc_root=proc, cgroup_root=root, **kwargs)


def test_v2_limited_leaf(tmp_path: Path) -> None:
    proc, root = make_tree(
        tmp_path,
        "0::/app.slice/job.scope\n",
        {
            "app.slice/job.scope/cpu.max": "150000 100000",
            "app.slice/job.scope/memory.max": str(2 * GiB),
            "app.slice/job.scope/memory.current": str(512 * MiB),
            # Looser limits above the leaf: the tightest level wins.
            "cpu.max": "400000 100000",
            "memory.max": str(8 * GiB),
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 2
    assert snap.cgroup_cpu_quota == 1.5
    assert snap.cgroup_mem_limit == 2 * GiB
    assert snap.cgroup_mem_usage == 512 * MiB
    assert snap.usable_cpus == 1  # 1.5 CPUs of quota rounds down
    assert snap.effective_mem_available == 2 * GiB - 512 * MiB
    assert snap.memory_limited_by_cgroup


def test_v2_unlimited(tmp_path: Path) -> None:
    proc, root = make_tree(
        tmp_path,
        "0::/user.slice\n",
        {
            "user.slice/cpu.max": "max 100000",
            "user.slice/memory.max": "max",
            "user.slice/memory.current": str(1 * GiB),
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 2
    assert snap.cgroup_cpu_quota is None
    assert snap.cgroup_mem_limit is None
    assert snap.cgroup_mem_usage == 1 * GiB
    assert snap.usable_cpus == 8
    assert snap.effective_mem_available == 12 * GiB
    assert not snap.memory_limited_by_cgroup


@pytest.mark.parametrize("cpu_dir", ["cpu,cpuacct", "cpu"])
def test_v1_limited(tmp_path: Path, cpu_dir: str) -> None:
    # A hybrid host also lists "0::/": the v1 controllers must still win.
    controllers = "cpu,cpuacct" if cpu_dir == "cpu,cpuacct" else "cpu"
    proc, root = make_tree(
        tmp_path,
        f"""
        12:memory:/docker/abc
        4:{controllers}:/docker/abc
        1:name=systemd:/docker/abc
        0::/
        """,
        {
            f"{cpu_dir}/docker/abc/cpu.cfs_quota_us": "250000",
            f"{cpu_dir}/docker/abc/cpu.cfs_period_us": "100000",
            "memory/docker/abc/memory.limit_in_bytes": str(1 * GiB),
            "memory/docker/abc/memory.usage_in_bytes": str(256 * MiB),
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 1
    assert snap.cgroup_cpu_quota == 2.5
    assert snap.usable_cpus == 2
    assert snap.cgroup_mem_limit == 1 * GiB
    assert snap.cgroup_mem_usage == 256 * MiB
    assert snap.effective_mem_available == 768 * MiB


def test_v1_unlimited(tmp_path: Path) -> None:
    proc, root = make_tree(
        tmp_path,
        "5:memory:/\n3:cpu,cpuacct:/\n",
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/memory.usage_in_bytes": str(300 * MiB),
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 1
    assert snap.cgroup_cpu_quota is None
    assert snap.cgroup_mem_limit is None
    assert snap.cgroup_mem_usage == 300 * MiB
    assert snap.usable_cpus == 8
    assert snap.effective_mem_available == 12 * GiB


def test_v2_container_falls_back_to_the_root(tmp_path: Path) -> None:
    # /proc/self/cgroup shows the host-side path; the container sees its own cgroup at the root.
    proc, root = make_tree(
        tmp_path,
        "0::/kubepods/burstable/pod123/ctr456\n",
        {"cpu.max": "200000 100000", "memory.max": str(4 * GiB), "memory.current": str(1 * GiB)},
    )
    snap = read_fake(proc, root)
    assert (snap.cgroup_cpu_quota, snap.cgroup_mem_limit) == (2.0, 4 * GiB)
    assert snap.effective_mem_available == 3 * GiB


def test_v1_container_falls_back_to_the_controller_root(tmp_path: Path) -> None:
    proc, root = make_tree(
        tmp_path,
        "7:memory:/docker/abc\n6:cpu,cpuacct:/docker/abc\n",
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "100000",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": str(3 * GiB),
            "memory/memory.usage_in_bytes": str(1 * GiB),
        },
    )
    snap = read_fake(proc, root)
    assert (snap.cgroup_cpu_quota, snap.cgroup_mem_limit) == (1.0, 3 * GiB)
    assert snap.effective_mem_available == 2 * GiB


def test_v2_limits_of_a_parent_cgroup_apply(tmp_path: Path) -> None:
    # A job in a child cgroup of a 1.5 GiB / 0.5-CPU slice: the leaf itself sets no limit.
    proc, root = make_tree(
        tmp_path,
        "0::/batch.slice/job-7.scope\n",
        {
            "batch.slice/cpu.max": "50000 100000",
            "batch.slice/memory.max": str(int(1.5 * GiB)),
            "batch.slice/memory.current": str(600 * MiB),  # siblings use the slice's memory too
            "batch.slice/job-7.scope/cpu.max": "max 100000",
            "batch.slice/job-7.scope/memory.max": "max",
            "batch.slice/job-7.scope/memory.current": str(100 * MiB),
        },
    )
    snap = read_fake(proc, root, logical_cpus=2, affinity_cpus=2, mem_available=20 * GiB)
    assert snap.cgroup_cpu_quota == 0.5
    assert (snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (int(1.5 * GiB), 600 * MiB)
    assert snap.effective_mem_available == int(1.5 * GiB) - 600 * MiB
    plan = plan_from_snapshot(snap, mem_per_task="512MiB")
    assert (plan.workers, plan.limited_by) == (1, "cpu")
    assert "cgroup quota 0.5" in plan.reason
    assert "cgroup limit 1.5 GiB" in format_snapshot(snap)


def test_v2_the_tightest_level_wins(tmp_path: Path) -> None:
    # The grandparent has the least CPU. The parent's memory limit is the higher one, but its
    # other children use most of it: the least headroom, not the lowest limit, bounds new work.
    proc, root = make_tree(
        tmp_path,
        "0::/a/b/c\n",
        {
            "a/cpu.max": "120000 100000",
            "a/b/cpu.max": "300000 100000",
            "a/b/c/cpu.max": "200000 100000",
            "a/b/memory.max": str(8 * GiB),
            "a/b/memory.current": str(int(7.5 * GiB)),
            "a/b/c/memory.max": str(4 * GiB),
            "a/b/c/memory.current": str(1 * GiB),
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_cpu_quota == 1.2
    assert (snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (8 * GiB, int(7.5 * GiB))
    assert snap.effective_mem_available == 512 * MiB


def test_v1_hierarchical_memory_limit_and_parent_cpu_quota(tmp_path: Path) -> None:
    # The parent's limits are not visible as the leaf's own files: memory.stat carries the
    # effective (hierarchical) memory limit, and the parent's CFS quota is found by walking up.
    proc, root = make_tree(
        tmp_path,
        "4:memory:/jobs/j1\n3:cpu,cpuacct:/jobs/j1\n",
        {
            "cpu,cpuacct/jobs/cpu.cfs_quota_us": "50000",
            "cpu,cpuacct/jobs/cpu.cfs_period_us": "100000",
            "cpu,cpuacct/jobs/j1/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/jobs/j1/cpu.cfs_period_us": "100000",
            "memory/jobs/j1/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/jobs/j1/memory.usage_in_bytes": str(200 * MiB),
            "memory/jobs/j1/memory.stat": f"cache 0\nrss 0\nhierarchical_memory_limit {int(1.5 * GiB)}\n"
            f"hierarchical_memsw_limit {V1_UNLIMITED}\n",
        },
    )
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 1
    assert snap.cgroup_cpu_quota == 0.5
    assert (snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (int(1.5 * GiB), 200 * MiB)


def test_v1_parent_memory_usage_counts(tmp_path: Path) -> None:
    proc, root = make_tree(
        tmp_path,
        "4:memory:/jobs/j1\n",
        {
            "memory/jobs/memory.limit_in_bytes": str(2 * GiB),
            "memory/jobs/memory.usage_in_bytes": str(int(1.5 * GiB)),
            "memory/jobs/j1/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/jobs/j1/memory.usage_in_bytes": str(100 * MiB),
            "memory/jobs/j1/memory.stat": f"hierarchical_memory_limit {2 * GiB}\n",
        },
    )
    snap = read_fake(proc, root)
    assert (snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (2 * GiB, int(1.5 * GiB))
    assert snap.effective_mem_available == 512 * MiB


def test_missing_cgroup_files_mean_no_limit(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, "0::/empty\n", {})
    (root / "empty").mkdir()
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 2
    assert (snap.cgroup_cpu_quota, snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (None,) * 3
    assert snap.effective_mem_available == 12 * GiB


def test_missing_proc_cgroup_means_no_cgroup(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, None, {"cpu.max": "100000 100000"})
    snap = read_fake(proc, root)
    assert snap.cgroup_version is None
    assert snap.cgroup_cpu_quota is None


def test_unreadable_and_malformed_files_mean_no_limit(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, "0::/\n", {"cpu.max": "lots 100000", "memory.current": "??"})
    (root / "memory.max").mkdir()  # reading a directory raises IsADirectoryError
    snap = read_fake(proc, root)
    assert (snap.cgroup_cpu_quota, snap.cgroup_mem_limit, snap.cgroup_mem_usage) == (None,) * 3


def test_v1_missing_controller_dirs_mean_no_limit(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, "3:cpu,cpuacct:/a\n4:memory:/a\n", {})
    snap = read_fake(proc, root)
    assert snap.cgroup_version == 1
    assert (snap.cgroup_cpu_quota, snap.cgroup_mem_limit) == (None, None)


def test_usage_above_limit_clamps_at_zero() -> None:
    snap = fake_snapshot(cgroup_mem_limit=1 * GiB, cgroup_mem_usage=2 * GiB)
    assert snap.effective_mem_available == 0


def test_read_without_overrides_uses_the_real_machine(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, None, {})
    snap = ResourceSnapshot.read(proc_root=proc, cgroup_root=root, environ={})
    assert snap.logical_cpus == (os.cpu_count() or 1)
    assert snap.mem_total > 0
    assert 0 < snap.mem_available <= snap.mem_total
    if hasattr(os, "sched_getaffinity"):
        assert snap.affinity_cpus == len(os.sched_getaffinity(0))


def test_memory_is_read_from_meminfo_as_psutil_reports_it(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, None, {})
    (proc / "meminfo").write_text("MemTotal:        2048 kB\nMemFree:  10 kB\n"
                                  "MemAvailable:    1024 kB\n")
    snap = ResourceSnapshot.read(proc_root=proc, cgroup_root=root, environ={})
    assert (snap.mem_total, snap.mem_available) == (2 * MiB, 1 * MiB)
    vm = psutil.virtual_memory()  # the real file: the same numbers as psutil's
    assert read_machine_memory()[0] == vm.total


@pytest.mark.parametrize("meminfo", [None, "MemTotal: 2048 kB\n", "MemTotal: x kB\nMemAvailable: 1 kB\n"])
def test_a_meminfo_without_both_fields_falls_back_to_psutil(tmp_path: Path, meminfo: str | None) -> None:
    proc, root = make_tree(tmp_path, None, {})
    if meminfo is not None:
        (proc / "meminfo").write_text(meminfo)
    snap = ResourceSnapshot.read(proc_root=proc, cgroup_root=root, environ={})
    assert snap.mem_total == psutil.virtual_memory().total


# --------------------------------------------------------------------------------------------------
# STAGEPOOL_MAX_WORKERS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [("3", 3), (" 12 ", 12), ("", None)])
def test_env_max_workers(tmp_path: Path, raw: str, expected: int | None) -> None:
    proc, root = make_tree(tmp_path, None, {})
    snap = read_fake(proc, root, environ={"STAGEPOOL_MAX_WORKERS": raw})
    assert snap.env_max_workers == expected


@pytest.mark.parametrize("raw", ["0", "-2", "abc", "1.5", "two"])
def test_invalid_env_max_workers_names_variable_and_value(tmp_path: Path, raw: str) -> None:
    proc, root = make_tree(tmp_path, None, {})
    with pytest.raises(ValueError, match="STAGEPOOL_MAX_WORKERS") as info:
        read_fake(proc, root, environ={"STAGEPOOL_MAX_WORKERS": raw})
    assert repr(raw) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Planning (pure, on hand-built snapshots)
# --------------------------------------------------------------------------------------------------


def fake_snapshot(**overrides: Any) -> ResourceSnapshot:
    fields: dict[str, Any] = {
        "logical_cpus": 8,
        "affinity_cpus": 8,
        "cgroup_version": None,
        "cgroup_cpu_quota": None,
        "mem_total": 16 * GiB,
        "mem_available": 12 * GiB,
        "cgroup_mem_limit": None,
        "cgroup_mem_usage": None,
        "env_max_workers": None,
    }
    fields.update(overrides)
    return ResourceSnapshot(**fields)


def test_limited_by_cpu() -> None:
    plan = plan_from_snapshot(fake_snapshot(affinity_cpus=4), mem_per_task="1GiB")
    assert (plan.workers, plan.limited_by, plan.cpus) == (4, "cpu", 4)
    assert plan.reason == (
        "4 workers: limited by cpu, 4 usable CPUs (logical 8, affinity 4, cgroup quota none)"
    )
    assert str(plan) == plan.reason


def test_limited_by_cpu_quota() -> None:
    plan = plan_from_snapshot(fake_snapshot(cgroup_version=2, cgroup_cpu_quota=1.5))
    assert (plan.workers, plan.limited_by) == (1, "cpu")
    assert plan.reason == (
        "1 worker: limited by cpu, 1 usable CPU (logical 8, affinity 8, cgroup quota 1.5)"
    )


def test_limited_by_memory() -> None:
    snap = fake_snapshot(mem_available=int(3.1 * GiB))
    plan = plan_from_snapshot(snap, mem_per_task="1.5GiB")
    assert (plan.workers, plan.limited_by) == (2, "memory")
    assert plan.mem_per_task == int(1.5 * GiB)
    assert plan.mem_available == int(3.1 * GiB)
    assert plan.reason == "2 workers: limited by memory, 3.1 GiB available / 1.5 GiB per task"


def test_limited_by_cgroup_memory_says_so() -> None:
    snap = fake_snapshot(cgroup_version=2, cgroup_mem_limit=2 * GiB, cgroup_mem_usage=512 * MiB)
    plan = plan_from_snapshot(snap, mem_per_task=512 * MiB)
    assert (plan.workers, plan.limited_by) == (3, "memory")
    assert plan.mem_available == int(1.5 * GiB)
    assert "1.5 GiB available under the cgroup limit" in plan.reason
    assert "2.0 GiB limit" in plan.reason


def test_insufficient_memory_still_runs_one_worker() -> None:
    snap = fake_snapshot(mem_available=int(0.8 * GiB))
    plan = plan_from_snapshot(snap, mem_per_task="1GiB")
    assert (plan.workers, plan.limited_by) == (1, "memory")
    assert "insufficient" in plan.reason
    assert "only 0.8 GiB available for 1.0 GiB per task: running 1 worker anyway" in plan.reason


def test_limited_by_max_workers() -> None:
    plan = plan_from_snapshot(fake_snapshot(), mem_per_task="1GiB", max_workers=3)
    assert (plan.workers, plan.limited_by) == (3, "max_workers")
    assert plan.reason == "3 workers: limited by max_workers=3"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_workers": 8}, "cpu"),  # cpu == max_workers
        ({"mem_per_task": "1.5GiB"}, "cpu"),  # 12 GiB / 1.5 GiB == 8 == cpu
        ({"mem_per_task": "3GiB", "max_workers": 4}, "memory"),  # memory == max_workers
    ],
)
def test_ties_prefer_cpu_then_memory(kwargs: dict[str, Any], expected: str) -> None:
    assert plan_from_snapshot(fake_snapshot(), **kwargs).limited_by == expected


@pytest.mark.parametrize("env", [4, 99999])
def test_env_is_a_maximum_that_never_raises_the_plan(env: int) -> None:
    snap = fake_snapshot(affinity_cpus=2, env_max_workers=env)
    plan = plan_from_snapshot(snap, mem_per_task="1GiB")
    assert (plan.workers, plan.limited_by) == (2, "cpu")
    assert plan_from_snapshot(snap, max_workers=1).workers == 1


def test_env_caps_the_plan_and_says_what_it_would_be() -> None:
    plan = plan_from_snapshot(fake_snapshot(env_max_workers=3), mem_per_task="1GiB")
    assert (plan.workers, plan.limited_by) == (3, "env")
    assert plan.reason == (
        "3 workers: limited by STAGEPOOL_MAX_WORKERS=3 (without it 8: limited by cpu, "
        "8 usable CPUs (logical 8, affinity 8, cgroup quota none))"
    )


def test_env_equal_to_the_plan_leaves_the_machine_limit_named() -> None:
    plan = plan_from_snapshot(fake_snapshot(affinity_cpus=4, env_max_workers=4))
    assert (plan.workers, plan.limited_by) == (4, "cpu")


@pytest.mark.parametrize(
    ("env", "requested", "expected", "how"),
    [
        (None, None, 2, "auto: limited by cpu, 2 usable CPUs"),
        (8, 1, 1, "explicit; the machine plan allows 2: limited by cpu"),
        (None, 4, 4, "explicit; the machine plan allows 2: limited by cpu"),
        (3, 4, 3, "explicit 4, capped by STAGEPOOL_MAX_WORKERS=3"),
        (1, None, 1, "auto: limited by STAGEPOOL_MAX_WORKERS=1 (without it 2"),
    ],
)
def test_choose_workers(env: int | None, requested: int | None, expected: int, how: str) -> None:
    plan = plan_from_snapshot(fake_snapshot(affinity_cpus=2, env_max_workers=env))
    workers, described = choose_workers(plan, requested)
    assert workers == expected
    noun = "worker" if expected == 1 else "workers"
    assert described.startswith(f"{expected} {noun} ({how}")


@pytest.mark.parametrize("requested", [60, None])
def test_more_workers_than_open_files_allow_is_refused(requested: int | None) -> None:
    snap = fake_snapshot(open_files_limit=128, logical_cpus=60, affinity_cpus=60)
    with pytest.raises(ValueError, match=r"workers=60 needs about 304 file descriptors .* only "
                       r"128 \(ulimit -n\); raise the limit or use fewer workers"):
        choose_workers(plan_from_snapshot(snap), requested)
    assert choose_workers(plan_from_snapshot(snap), 16)[0] == 16


def test_read_takes_the_soft_open_files_limit(tmp_path: Path) -> None:
    import resource

    proc, root = make_tree(tmp_path, None, {})
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    expected = None if soft == resource.RLIM_INFINITY else soft
    assert read_fake(proc, root).open_files_limit == expected


def test_overcommit_warning_only_past_the_memory_bound() -> None:
    snap = fake_snapshot(mem_available=int(23 * GiB))
    plan = plan_from_snapshot(snap, mem_per_task="8GiB")
    assert overcommit_warning(plan, 2) is None
    assert overcommit_warning(plan, 4) == (
        "workers=4 x mem_per_task=8.0 GiB needs 32.0 GiB, but 23.0 GiB is available: memory "
        "allows 2 workers. Starting 4 anyway risks swapping or the OOM killer; use "
        "workers='auto', fewer workers or a smaller mem_per_task"
    )
    assert overcommit_warning(plan_from_snapshot(snap), 64) is None  # no mem_per_task: no claim


def test_overcommit_warning_names_the_cgroup() -> None:
    snap = fake_snapshot(cgroup_version=2, cgroup_mem_limit=2 * GiB, cgroup_mem_usage=0)
    message = overcommit_warning(plan_from_snapshot(snap, mem_per_task="1GiB"), 3)
    assert message is not None
    assert "2.0 GiB is available under the cgroup limit: memory allows 2 workers" in message


def test_one_worker_that_does_not_fit_is_the_plans_own_choice() -> None:
    plan = plan_from_snapshot(fake_snapshot(mem_available=GiB), mem_per_task="4GiB")
    assert plan.workers == 1
    assert overcommit_warning(plan, 1) is None


def test_reserve_cores() -> None:
    plan = plan_from_snapshot(fake_snapshot(), reserve_cores=2)
    assert (plan.workers, plan.limited_by, plan.cpus) == (6, "cpu", 8)
    assert "reserve_cores=2" in plan.reason


def test_reserve_cores_mentioned_when_another_limit_wins() -> None:
    plan = plan_from_snapshot(fake_snapshot(), reserve_cores=1, max_workers=2)
    assert (plan.workers, plan.limited_by) == (2, "max_workers")
    assert "reserve_cores=1" in plan.reason


def test_reserving_every_core_still_runs_one_worker() -> None:
    plan = plan_from_snapshot(fake_snapshot(affinity_cpus=2), reserve_cores=4)
    assert (plan.workers, plan.limited_by) == (1, "cpu")
    assert "running 1 worker anyway" in plan.reason


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"reserve_cores": -1}, ValueError, "reserve_cores"),
        ({"reserve_cores": 1.5}, TypeError, "reserve_cores"),
        ({"reserve_cores": True}, TypeError, "reserve_cores"),
        ({"max_workers": 0}, ValueError, "max_workers"),
        ({"max_workers": "2"}, TypeError, "max_workers"),
        ({"mem_per_task": 0}, ValueError, "mem_per_task"),
        ({"mem_per_task": "0.1B"}, ValueError, "mem_per_task"),
        ({"mem_per_task": -5}, ValueError, "mem_per_task"),
        ({"mem_per_task": "lots"}, ValueError, "mem_per_task"),
        ({"mem_per_task": [1]}, TypeError, "mem_per_task"),
    ],
)
def test_bad_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        plan_from_snapshot(fake_snapshot(), **kwargs)


def test_snapshot_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="logical_cpus"):
        fake_snapshot(logical_cpus=0)
    with pytest.raises(ValueError, match="cgroup_cpu_quota"):
        fake_snapshot(cgroup_cpu_quota=0.0)


def test_snapshot_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        fake_snapshot().logical_cpus = 2  # type: ignore[misc]


def test_thread_env_splits_cpus_and_skips_user_set_vars() -> None:
    plan = plan_from_snapshot(fake_snapshot(), max_workers=2)
    env = plan.thread_env({"OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "", "PATH": "/bin"})
    assert "OMP_NUM_THREADS" not in env
    assert env == {**{name: "4" for name in THREAD_ENV_VARS if name != "OMP_NUM_THREADS"},
                   "STAGEPOOL_WORKER_THREADS": "7"}  # the user's OpenMP choice is the budget


def test_thread_env_never_below_one_thread() -> None:
    plan = plan_from_snapshot(fake_snapshot(affinity_cpus=2))
    assert set(plan.thread_env({}, workers=16).values()) == {"1"}


def test_format_snapshot_mentions_every_source() -> None:
    snap = fake_snapshot(
        cgroup_version=2,
        cgroup_cpu_quota=1.5,
        cgroup_mem_limit=2 * GiB,
        cgroup_mem_usage=512 * MiB,
        env_max_workers=3,
    )
    text = format_snapshot(snap)
    assert len(text.splitlines()) >= 4
    for needle in (
        "logical 8",
        "affinity 8",
        "cgroup quota 1.5",
        "usable 1",
        "total 16.0 GiB",
        "available 12.0 GiB",
        "cgroup limit 2.0 GiB",
        "cgroup usage 512.0 MiB",
        "effective 1.5 GiB",
        "v2",
        "STAGEPOOL_MAX_WORKERS: 3",
    ):
        assert needle in text


snapshots = st.builds(
    ResourceSnapshot,
    logical_cpus=st.integers(1, 512),
    affinity_cpus=st.none() | st.integers(1, 512),
    cgroup_version=st.sampled_from([None, 1, 2]),
    cgroup_cpu_quota=st.none() | st.floats(0.01, 600, allow_nan=False),
    mem_total=st.integers(0, 2**42),
    mem_available=st.integers(0, 2**42),
    cgroup_mem_limit=st.none() | st.integers(0, 2**42),
    cgroup_mem_usage=st.none() | st.integers(0, 2**42),
    env_max_workers=st.none() | st.integers(1, 1024),
)


@settings(max_examples=300, deadline=None)
@given(
    snap=snapshots,
    mem_per_task=st.none() | st.integers(1, 2**38),
    reserve_cores=st.integers(0, 600),
    max_workers=st.none() | st.integers(1, 1024),
)
def test_workers_always_within_bounds(
    snap: ResourceSnapshot, mem_per_task: int | None, reserve_cores: int, max_workers: int | None
) -> None:
    plan = plan_from_snapshot(
        snap, mem_per_task=mem_per_task, reserve_cores=reserve_cores, max_workers=max_workers
    )
    assert plan.reason.startswith(f"{plan.workers} worker")
    if snap.env_max_workers is not None:
        assert plan.workers <= snap.env_max_workers
        assert (plan.limited_by == "env") == (plan.workers < plan_from_snapshot(
            dataclasses.replace(snap, env_max_workers=None), mem_per_task=mem_per_task,
            reserve_cores=reserve_cores, max_workers=max_workers).workers)
    assert 1 <= plan.workers <= max(1, snap.usable_cpus)
    if max_workers is not None:
        assert plan.workers <= max_workers
    if mem_per_task is not None:
        assert plan.workers <= max(1, snap.effective_mem_available // mem_per_task)


def test_plan_workers_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGEPOOL_MAX_WORKERS", raising=False)
    plan = plan_workers(mem_per_task="64MiB")
    assert isinstance(plan, WorkerPlan)
    assert plan.workers >= 1
    assert plan.reason
    assert format_snapshot(plan.snapshot)


def test_plan_workers_uses_the_given_snapshot() -> None:
    plan = plan_workers(snapshot=fake_snapshot(affinity_cpus=3))
    assert (plan.workers, plan.limited_by) == (3, "cpu")


# --------------------------------------------------------------------------------------------------
# Process helpers, on real processes
# --------------------------------------------------------------------------------------------------

CHILD = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``pid`` to exit (a zombie counts as gone: it runs nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.timeout(30)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sigterm", ["obey", "ignore"])
def test_kill_tree_kills_child_and_grandchild(sigterm: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, sigterm], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert grandchild in process_tree_pids(child.pid)
        started = time.monotonic()
        kill_tree(child.pid, grace=0.3)
        elapsed = time.monotonic() - started
        child.wait(timeout=5)
        assert gone(grandchild, timeout=5)
        assert elapsed < 5
        if sigterm == "ignore":
            assert elapsed >= 0.25  # it really waited for the grace period before SIGKILL
    finally:
        child.kill()
        child.wait(timeout=5)
        if child.stdout is not None:
            child.stdout.close()


def test_kill_tree_ignores_a_missing_process() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    kill_tree(dead.pid)  # must not raise
    assert rss_of(dead.pid) is None
    assert process_tree_pids(dead.pid) == []


def test_kill_tree_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="calling process"):
        kill_tree(os.getpid())
    with pytest.raises(ValueError, match="grace"):
        kill_tree(1, grace=-1)


def test_rss_of_this_process() -> None:
    rss = rss_of(os.getpid())
    assert rss is not None
    assert rss > 1 * MiB
