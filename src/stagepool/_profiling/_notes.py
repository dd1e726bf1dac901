"""Notes on a profile (pure): what the recommendation alone does not say.

Failed sample items, a machine that was busy or noisy while it measured, a stage that mostly
waits, and what keeping malloc's memory would buy. Each function returns zero or one note (a
tuple), so ``profile_stage`` simply concatenates them. Also the machine facts a profile records.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from .._config import format_size
from .._planning import count_of
from .._probe import KEEP_MALLOC_BYTES
from .._resources import ResourceSnapshot
from ._measured import PAGE_BYTES, SerialPass, SweepRun, cpu_ratio
from ._plan import SweepPlan
from ._recommend import Recommendation
from ._text import secs

__all__ = [
    "failure_notes",
    "load_average",
    "load_note",
    "machine_facts",
    "malloc_note",
    "noise_note",
    "waiting_note",
]

# Rounds of one configuration this far apart get a note: the machine was not quiet.
NOISY_SPREAD = 0.2
# The malloc note is worth its length only when keeping malloc's memory made items this much
# faster in the serial pass.
MALLOC_NOTE_GAIN = 0.10
# A one-minute load average over this share of the usable CPUs before the profile starts means
# other work is competing for the CPUs: the profile says its numbers are noisy.
BUSY_LOAD = 0.5


def failure_notes(serial: SerialPass) -> tuple[str, ...]:
    failed = serial.failed
    if not failed:
        return ()
    return (f"{len(failed)} of {len(serial.items)} sampled items failed and were left out of the "
            f"sweep; item {failed[0].position}: {failed[0].error}",)


def machine_facts(snapshot: ResourceSnapshot, budget: int | None, load: float | None,
                  ) -> dict[str, Any]:
    return {"usable_cpus": snapshot.usable_cpus, "logical_cpus": snapshot.logical_cpus,
            "mem_available": snapshot.effective_mem_available, "mem_limit": budget,
            "load_average_before": load, "python": sys.version.split()[0],
            "platform": sys.platform}


def noise_note(runs: Sequence[SweepRun], plan: SweepPlan) -> tuple[str, ...]:
    """Rounds of one configuration that differ a lot: something else was using the machine."""
    notes = []
    again = [r for r in runs if len(r.rounds) > plan.repeat]
    if again:
        notes.append(f"{len(again)} configurations ran an extra round because other processes "
                     "took the CPUs from their workers in every round")
    worst = max(runs, key=lambda r: r.spread)
    if worst.spread >= NOISY_SPREAD:
        notes.append(f"rounds of one configuration differed by up to {worst.spread:.0%} "
                     f"({count_of(worst.workers, 'worker')}, chunk {worst.chunk_size}): the fastest round of "
                     "each counts, but on a quieter machine the recommendation would be firmer")
    return tuple(notes)


def malloc_note(serial: SerialPass) -> tuple[str, ...]:
    """What keeping malloc's big blocks bought in the serial pass, when it was worth trying."""
    kept = serial.kept_malloc_wall
    if kept is None or kept.mean > serial.wall.mean * (1 - MALLOC_NOTE_GAIN):
        return ()
    fresh = serial.faults.mean * PAGE_BYTES
    return (f"each item touches {format_size(fresh)} of fresh memory (glibc's malloc gives big "
            f"blocks back to the system after every item); with malloc keeping them, items took "
            f"{secs(kept.mean)} instead of {secs(serial.wall.mean)} "
            f"({1 - kept.mean / serial.wall.mean:.0%} less). For every worker: set "
            f"MALLOC_MMAP_THRESHOLD_={KEEP_MALLOC_BYTES} MALLOC_TRIM_THRESHOLD_="
            f"{2 * KEEP_MALLOC_BYTES} in the environment before the Engine starts (workers "
            "inherit it); a big chunk (see chunk_size) triggers the same by raising glibc's "
            "threshold",)


def waiting_note(serial: SerialPass, rec: Recommendation) -> tuple[str, ...]:
    """A stage that mostly waits (I/O, sleep, a service) may use more workers than CPUs."""
    ratio = cpu_ratio(serial)
    if rec.limited_by != "cpu" or ratio is None or ratio >= 0.5:
        return ()
    return (f"the stage mostly waits (CPU/wall {ratio:.2f}): more workers than CPUs may pay; "
            "measure them with workers=[...] (--max-workers N)",)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def load_note(load: float | None, snapshot: ResourceSnapshot) -> tuple[str, ...]:
    """Other work on the machine skews every measurement: say so when there was some."""
    if load is None or load < BUSY_LOAD * snapshot.usable_cpus:
        return ()
    return (f"the machine was busy before the profile started (load average {load:.1f} on "
            f"{snapshot.usable_cpus} usable CPUs): throughputs are noisy; profile on a quiet "
            "machine for a firmer recommendation",)
