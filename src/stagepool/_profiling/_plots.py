"""The profile's plots: throughput against workers, and CPU % and RSS per worker over time.

matplotlib is optional and imported lazily: Figure objects only (no pyplot state, no GUI
backend). Without it the plots are skipped with a note, never an error.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._report import StageProfile

__all__ = ["plot"]


def plot(p: StageProfile, directory: Path) -> tuple[list[Path], str | None]:
    """Write throughput.png and workers.png into ``directory``; their paths, and a note instead
    when matplotlib is missing (then no paths). Raises ``OSError`` when a file cannot be written."""
    try:
        figure: Any = importlib.import_module("matplotlib.figure")
    except ImportError:
        return [], ("plots skipped: matplotlib is not installed "
                    "(pip install matplotlib, or stagepool's bench extra)")
    paths = [directory / "throughput.png", directory / "workers.png"]
    _plot_throughput(figure.Figure(figsize=(7, 4.5)), p, paths[0])
    _plot_timeline(figure.Figure(figsize=(9, 6)), p, paths[1])
    return paths, None


def _plot_throughput(fig: Any, p: StageProfile, path: Path) -> None:
    ax = fig.add_subplot()
    for chunk in sorted({r.chunk_size for r in p.runs}):
        runs = sorted((r for r in p.runs if r.chunk_size == chunk), key=lambda r: r.workers)
        ax.plot([r.workers for r in runs], [r.adjusted for r in runs], marker="o",
                label=f"chunk {chunk}")
    counts = sorted({r.workers for r in p.runs})
    ideal = 1 / max(p.serial.wall.mean, 1e-12)
    ax.plot(counts, [w * ideal for w in counts], linestyle="--", color="grey",
            label="ideal: workers / serial time per item")
    if p.confirmation is not None:
        ax.scatter([p.confirmation.workers], [p.confirmation.adjusted], marker="*", s=220,
                   color="black", zorder=5, label="recommended (confirmed)")
    ax.set_xticks(counts)
    ax.set_xlabel("workers")
    ax.set_ylabel("items / s (adjusted for CPU taken by other processes)")
    ax.set_title(f"{p.stage}: throughput vs workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_timeline(fig: Any, p: StageProfile, path: Path) -> None:
    cpu_ax, rss_ax = fig.subplots(2, 1, sharex=True)
    for pid in sorted({s.pid for s in p.samples}):
        mine = [s for s in p.samples if s.pid == pid]
        cpu = [(s.t, s.cpu_percent) for s in mine if s.cpu_percent is not None]
        rss = [(s.t, s.rss / 2**20) for s in mine if s.rss is not None]
        if cpu:
            cpu_ax.plot(*zip(*cpu, strict=True), linewidth=1, label=f"pid {pid}")
        if rss:
            rss_ax.plot(*zip(*rss, strict=True), linewidth=1)
    runs = [*p.runs, *([p.confirmation] if p.confirmation else [])]
    for i, run in enumerate(runs):
        for ax in (cpu_ax, rss_ax):
            ax.axvspan(run.started, run.ended, color="C0" if i % 2 else "C1", alpha=0.08)
        cpu_ax.text((run.started + run.ended) / 2, 1.0, run.label, rotation=90, fontsize=6,
                    ha="center", va="bottom", transform=cpu_ax.get_xaxis_transform())
    cpu_ax.set_ylabel("CPU % per worker")
    rss_ax.set_ylabel("RSS MiB per worker")
    rss_ax.set_xlabel("seconds since the profile started (shaded: measured runs)")
    for ax in (cpu_ax, rss_ax):
        ax.grid(alpha=0.3)
    if len({s.pid for s in p.samples}) <= 12:
        cpu_ax.legend(fontsize="x-small", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
