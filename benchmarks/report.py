"""Turning rows into a terminal table, ``results.json`` and (if matplotlib is there) PNG plots.

A row is a plain dict (see ``cli.build_row``): ``key, label, status, reason, median_s, min_s, max_s,
startup_s, metric, metric_text, vs_ppe, foreign_cpu, targets, result, throughput``. "other cpu" is
the share of the machine's CPU used by processes outside the harness while the row ran (noise
indicator). Everything here is pure formatting, tested without any pool; ``render.py`` turns the
same cells into Markdown.

Plots (``write_plots``): ``throughput-<workload>.png``, one bar per row (work per second at the
median run, whiskers at the slowest and fastest run; stagepool in orange; a row that did not do
the work is a labelled gap), and ``async-latency.png``, the distribution of event-loop lag (its tail).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ASYNC_PLOT", "HEADERS", "format_seconds", "format_table", "format_workload",
           "plot_bars", "plot_name", "workload_table", "write_json", "write_plots"]

ASYNC_PLOT = "async-latency.png"

HEADERS = ("peer", "metric", "median s", "min-max s", "start s", "vs PPE", "other cpu", "target",
           "result")


def format_seconds(value: float | None) -> str:
    """Seconds with 3 significant digits (``0.00123``, ``1.23``, ``123``) but no more than 6
    decimals (``0.000008``); '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    digits = min(6, max(0, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, a rule under the header."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row!r}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)


def _cells(row: dict[str, Any], note: int | None) -> list[str]:
    label = row["label"]
    if row["status"] != "ok":
        status = row["status"]
        return [label, f"{status} [{note}]" if note is not None else status,
                "-", "-", "-", "-", _share(row.get("foreign_cpu")), _target_text(row),
                "FAIL" if row.get("targets") else ""]
    vs = row.get("vs_ppe")
    spread = f"{format_seconds(row['min_s'])}-{format_seconds(row['max_s'])}"
    metric = row["metric_text"] + (f" [{note}]" if note is not None else "")
    return [label, metric, format_seconds(row["median_s"]), spread,
            format_seconds(row.get("startup_s")), "-" if vs is None else f"{vs:.2f}x",
            _share(row.get("foreign_cpu")), _target_text(row), row.get("result", "")]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _target_text(row: dict[str, Any]) -> str:
    return "; ".join(f"{t['text']} ({t['detail']})" for t in row.get("targets", []))


def _note(row: dict[str, Any]) -> str | None:
    """The footnote of a row: why it is n/a, its error's last line, stragglers, hangs."""
    reason = (row.get("reason") or "").strip()
    if row["status"] == "error" and reason:
        reason = reason.splitlines()[-1]
    parts = [reason] if reason else []
    if row.get("left_behind"):
        parts.append(f"{len(row['left_behind'])} process(es) still running after close(); killed")
    return "; ".join(parts) or None


def workload_table(rows: Sequence[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """The cells of a workload's table (one list per row, in ``HEADERS`` order) and its numbered
    footnotes (why a row is n/a, an error's last line, stragglers)."""
    notes: list[str] = []
    body = []
    for row in rows:
        note = _note(row)
        number = None
        if note is not None and not row.get("derived"):
            notes.append(f"[{len(notes) + 1}] {row['key']}: {note}")
            number = len(notes)
        body.append(_cells(row, number))
    return body, notes


def format_workload(name: str, question: str, rows: Sequence[dict[str, Any]],
                    facts: str = "") -> str:
    """The block printed for one workload: title, table, footnotes."""
    body, notes = workload_table(rows)
    out = [f"== {name}: {question}"]
    if facts:
        out.append(f"   {facts}")
    out.append(format_table(HEADERS, body))
    out.extend(notes)
    return "\n".join(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a file); NaN/inf become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(data), indent=2, sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def plot_name(workload: str) -> str:
    return f"throughput-{workload}.png"


def plot_bars(rows: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """What a workload's throughput chart shows: (unit, bars). A bar is ``label, value, low, high,
    stagepool`` and ``note`` (why there is no bar: the row's status or what its metric says).
    Derived rows are left out, and so are ok rows the workload gives no work for (a reference row
    like the idle loop)."""
    unit = next((r["throughput"]["unit"] for r in rows if r.get("throughput")), "")
    bars = []
    for row in rows:
        if row.get("derived") or (row["status"] == "ok" and not row.get("throughput")):
            continue
        t = row.get("throughput") or {}
        value = t.get("per_s", 0.0)
        note = "" if value > 0 else (row["status"] if row["status"] != "ok"
                                     else row["metric_text"].split(";")[0][:48])
        bars.append({"label": row["label"], "value": value, "low": t.get("low", value),
                     "high": t.get("high", value), "stagepool": row["peer"] == "stagepool",
                     "note": note})
    return unit, bars


def write_plots(out: Path, workloads: dict[str, dict[str, Any]]) -> list[str]:
    """Write every workload's throughput chart and the async latency plot into ``out``; return the
    file names written (none without matplotlib: plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, block in workloads.items():
        unit, bars = plot_bars(block["rows"])
        if any(b["value"] > 0 for b in bars):
            _bar_chart(plt, out / plot_name(name), name, unit, bars)
            written.append(plot_name(name))
    lags = {r["label"]: r["extra"]["lags_ms"] for w in workloads.values() for r in w["rows"]
            if r["status"] == "ok" and r.get("extra", {}).get("lags_ms")}
    if lags:
        _latency_plot(plt, out / ASYNC_PLOT, lags)
        written.append(ASYNC_PLOT)
    return written


def _bar_chart(plt: Any, path: Path, name: str, unit: str, bars: list[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.32 * len(bars)))
    values = [b["value"] for b in bars]
    low = [max(0.0, b["value"] - b["low"]) for b in bars]
    high = [max(0.0, b["high"] - b["value"]) for b in bars]
    colors = ["tab:orange" if b["stagepool"] else "tab:blue" for b in bars]
    ax.barh([b["label"] for b in bars], values, xerr=[low, high], color=colors, capsize=2)
    positive = [v for v in values if v > 0]
    wide = len(positive) > 1 and max(positive) > 50 * min(positive)
    if wide:
        ax.set_xscale("log")
    for y, bar in enumerate(bars):
        if bar["note"]:
            x = min(positive) if wide else 0
            ax.text(x, y, f" {bar['note']}", va="center", fontsize=7, color="dimgray")
    ax.invert_yaxis()
    ax.set_title(f"{name}: {unit} per second (median run, whiskers min-max; higher is better"
                 f"{', log scale' if wide else ''})", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _latency_plot(plt: Any, path: Path, lags: dict[str, list[float]]) -> None:
    """Per row, the share of wake-ups later than x (log-log, so the tail shows: p99 is where a
    curve crosses 0.01); the stagepool target (p99 < 5 ms) marked."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for label, samples in lags.items():
        ordered = sorted(max(s, 1e-3) for s in samples)
        n = len(ordered)
        ax.step(ordered, [(n - i) / n for i in range(n)], where="post", label=label)
    ax.axvline(5.0, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(0.01, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("event-loop lag of a 1 ms sleep, ms", fontsize=8)
    ax.set_ylabel("share of wake-ups this late or later", fontsize=8)
    ax.set_title("async: loop lag while a batch runs (dashed: 5 ms; dotted: 1% = p99; lower-left "
                 "is better)", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
