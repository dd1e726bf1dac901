"""Render a run's ``results.json`` as Markdown: the page BENCHMARKS.md is.

    python -m benchmarks.render benchmarks/results/results.json > BENCHMARKS.md
    python -m benchmarks --out benchmarks/results --markdown BENCHMARKS.md   # the same, in one go

The page holds the command that produced the numbers, the machine, each workload's question,
facts and table (the terminal table's cells), and links to the plots, written relative to where
the page lives (``--images`` overrides the folder). Pure: reads JSON, returns text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import report

__all__ = ["main", "markdown_table", "render_markdown", "summary_rows", "write_markdown"]


def markdown_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    """A GitHub table; ``|`` inside a cell is escaped, empty cells stay empty."""
    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def _machine(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    v = m.get("versions", {})
    peers = ", ".join(f"{k} {v[k]}" for k in ("loky", "joblib", "mpire", "pebble", "distributed")
                      if v.get(k))
    start = m.get("loadavg_start", [None])[0]
    end = (m.get("loadavg_end") or [None])[0]
    load = (f"{start:.2f} at the start, {end:.2f} at the end" if start is not None
            and end is not None else "not recorded")
    return [
        f"- {m['cpus']} CPUs (affinity {m['affinity']}), "
        f"{m['memory_total_bytes'] / 2**30:.1f} GiB RAM, {m['platform']}",
        f"- Python {m['python']} ({m['implementation']}), default start method "
        f"{m['mp_default_start_method']}, numpy {v.get('numpy')}, stagepool {v.get('stagepool')}",
        f"- peers: {peers}",
        f"- stagepool's plan: {m['stagepool_plan']}",
        f"- 1-minute load average: {load} (the machine is shared: the \"other cpu\" column is the "
        "share of the CPU other processes used while a row ran)",
    ]


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """One line per workload for the page's summary: stagepool's judged row (or its first row),
    its metric, its ratio against ProcessPoolExecutor, its targets and verdict."""
    lines = []
    for name, block in results["workloads"].items():
        rows = [r for r in block["rows"] if r["peer"] == "stagepool"]
        row = next((r for r in rows if "targets" in r), rows[0] if rows else None)
        if row is None:
            continue
        vs = row.get("vs_ppe")
        metric = row["metric_text"] if row["status"] == "ok" else row["status"]
        targets = "; ".join(f"{t['text']} ({t['detail']})" for t in row.get("targets", []))
        lines.append([name, metric, "-" if vs is None else f"{vs:.2f}x", targets or "-",
                      row.get("result", "")])
    return lines


def render_markdown(results: dict[str, Any], images: str) -> str:
    """The whole page. ``images``: the plots' folder as the page should link it ("" for none)."""
    settings = results["settings"]
    plots = set(results.get("plots", []))
    when = results.get("date", "")
    out = [
        "# stagepool benchmarks",
        "",
        "stagepool and the pools people would otherwise use, side by side on the same machine in "
        "the same run (the harness: [benchmarks/](benchmarks/README.md)). Higher \"vs PPE\" is "
        "faster than `concurrent.futures.ProcessPoolExecutor` in the same run; PASS/FAIL judge "
        "stagepool rows against the targets in the issues.",
        "",
        f"Produced by `{settings.get('command', 'python -m benchmarks')}`"
        + (f" on {when}" if when else "") + f", in {results.get('elapsed_s', 0) / 60:.0f} min; "
        f"this page by `python -m benchmarks.render {_join(images, 'results.json')} > "
        "BENCHMARKS.md`.",
        "",
        "## Summary: stagepool's rows",
        "",
        markdown_table(("workload", "stagepool", "vs PPE", "targets", "result"),
                       summary_rows(results)),
        "",
        "## Machine",
        "",
        *_machine(results),
        "",
        f"Method: {results.get('method', '')}.",
    ]
    for name, block in results["workloads"].items():
        body, notes = report.workload_table(block["rows"])
        out += ["", f"## {name}", "", f"**{block['question']}**", ""]
        if block.get("facts"):
            out += [block["facts"], ""]
        out.append(markdown_table(report.HEADERS, body))
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
        for plot in (report.plot_name(name), report.ASYNC_PLOT if name == "async" else ""):
            if plot and plot in plots:
                out += ["", f"![{plot}]({_join(images, plot)})"]
    return "\n".join(out) + "\n"


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name


def write_markdown(path: Path, results: dict[str, Any], plots_dir: Path) -> None:
    """Write the page to ``path``, linking the plots in ``plots_dir`` relative to it."""
    images = Path(os.path.relpath(plots_dir.resolve(), path.resolve().parent)).as_posix()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results, "" if images == "." else images))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render",
                                     description="results.json -> Markdown (BENCHMARKS.md)")
    parser.add_argument("results", type=Path, help="a results.json written by python -m benchmarks")
    parser.add_argument("--images", default=None,
                        help="how the page links the plots' folder (default: the folder of "
                             "results.json relative to the current directory)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    images = args.images
    if images is None:
        images = Path(os.path.relpath(args.results.resolve().parent)).as_posix()
    sys.stdout.write(render_markdown(results, "" if images == "." else images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
