"""The resource profiler behind ``stagepool profile``: measure a stage, recommend its Engine settings.

One call of :func:`profile_stage` runs these steps, in the caller's thread (plus one sampler
thread during the sweep)::

    sample items --list--> serial pass: Engine(workers=1), one submit per item of measure_item
        |                  (in the worker: wall and CPU time, RSS before and peak, result size;
        |                   in the parent: pickled item size, round trip) and worker_facts
        |                  (baseline RSS, BLAS threads; its USS read by pid from the parent)
        v
    sweep plan (pure): worker counts 1 .. min(usable CPUs, memory budget / memory per task),
        |              chunk sizes 1 .. ~0.5 s of work per chunk, items per run (~run_seconds)
        v
    sweep: `repeat` rounds over every configuration, each run in a fresh Engine (a worker's
        |  history changes its speed), engine.map(fn, items, chunk_size=c); the fastest round
        |  counts. Meanwhile _Sampler (a thread, every 100 ms) reads CPU % and RSS of
        |  engine.worker_pids()
        v
    recommend (pure): the fastest configuration within TOLERANCE of the best with the fewest
        |             workers and smallest chunk; mem_per_task and timeout from the measurements;
        |             a reason for each
        v
    confirmation: Engine(**recommended) on the same items, `repeat` runs, the fastest counts
        |         (again without the timeout when the timeout seems to cost throughput)
        v
    StageProfile --out--> profile.json (load_profile, Engine(**...)), measurements.json, *.png

Everything that decides (``chunk_candidates``, ``recommend_timeout``, ``_recommend``, ...) is a pure
function of the measurements, so it can be tested without processes. Plots need matplotlib (an
optional extra), imported lazily; without it the plots are skipped with a note.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import pickle
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from ._chunking import validate_chunk_size
from ._config import check_positive_int, format_size, parse_size
from ._engine import Engine
from ._probe import KEEP_MALLOC_BYTES, keep_malloc_memory, measure_item, worker_facts
from ._profile_file import PROFILE_FORMAT, load_profile  # lives below the engine; named here too
from ._resources import THREAD_ENV_VARS, ResourceSnapshot, cpu_rss_sampler, uss_of
from ._worker import dumps

__all__ = [
    "PROFILE_FORMAT",
    "SerialPass",
    "Spread",
    "StageProfile",
    "SweepRun",
    "WorkerSample",
    "chunk_candidates",
    "load_profile",
    "profile_stage",
    "recommend_timeout",
    "resolve_target",
    "sample_from_factory",
]

# Throughputs closer than this are a tie (run-to-run noise on a busy machine is a few per cent): a
# tie goes to fewer workers (less memory, CPUs left for the rest of the pipeline), then to smaller
# chunks (finer load balance at the tail of a batch, smoother progress, less data in flight).
TOLERANCE = 0.02
# The largest chunk worth trying holds this much work. The round trip (~0.1-1 ms) is under 1 % of
# a 50 ms chunk already, but a chunk's size also changes the worker's memory behaviour (a big
# chunk raises glibc's mmap threshold, and the stage's temporaries stop page-faulting: 33 % on the
# demo stage here), so sizes up to ~0.5 s of work are tried; the smallest near the best wins.
MAX_CHUNK_SECONDS = 0.5
# At most this many chunk sizes per worker count (spread geometrically): each costs one run.
MAX_CHUNK_CANDIDATES = 5
# Every worker gets at least this many chunks per run, or the tail dominates the measurement.
MIN_CHUNKS_PER_WORKER = 4
# Bounds the list a run maps over when items are tiny (8 MB of references; pickled in chunks).
MAX_RUN_ITEMS = 1_000_000
# Copies of the sample made so that no chunk holds the same object twice (pickle would send it
# once and understate the cost of shipping a chunk), up to this many bytes.
MAX_COPY_BYTES = 256 * 2**20
# The sampler's period: fine enough to see a run of ~1 s, rare enough to cost well under 1 %
# of one CPU (two small /proc reads per worker per sample).
SAMPLE_INTERVAL = 0.1
# Memory per task = (worker baseline + peak growth + a chunk's payload) x this, for what the sample
# did not show (a bigger item, fragmentation).
MEM_SAFETY = 1.25
# Timeout = max(p99 x TIMEOUT_P99_FACTOR, slowest x TIMEOUT_SLOWEST_FACTOR, TIMEOUT_FLOOR). A
# timeout kills and respawns the worker, so it must only catch real hangs: never below a second,
# where a GC pause or a busy machine could trip it.
TIMEOUT_P99_FACTOR = 5.0
TIMEOUT_SLOWEST_FACTOR = 2.0
TIMEOUT_FLOOR = 1.0
# Workers idle this share of the time waiting for pickling and pipes: the parent is what limits,
# whatever the worker count.
IPC_BOUND = 0.5
# Items that page-fault more than FAULT_NOTE_BYTES each are timed again with malloc keeping its
# big blocks (the probe's KEEP_MALLOC_BYTES).
FAULT_NOTE_BYTES = 2 * 2**20
PAGE_BYTES = 4096
MALLOC_EXPERIMENT_SECONDS = 2.0
MALLOC_NOTE_GAIN = 0.10
# Adjusted throughput never credits a run with more than twice what it measured.
MIN_CPU_SHARE = 0.5
# A run whose workers got less than this share of the CPU they should have used while inside
# items was disturbed by other processes (see _disturbed).
DISTURBED_SHARE = 0.8
# Rounds of one configuration this far apart get a note: the machine was not quiet.
NOISY_SPREAD = 0.2
# CPU time per item is only meaningful above this (the CPU clock costs ~1 us to read).
MIN_CLOCKED_SECONDS = 50e-6
# When Engine(**recommended) runs this much slower than the same configuration without the
# timeout did in the sweep, it is measured once more without it, and the timeout is dropped if
# that is this much faster: per-item clocking is what a timeout costs on tiny items.
TIMEOUT_COST = 0.10
# Items longer than this cannot lose TIMEOUT_COST to two clock reads each: not worth checking.
TIMED_ITEM_MAX_SECONDS = 20e-6
# A one-minute load average over this share of the usable CPUs before the profile starts means
# other work is competing for the CPUs: the profile says its numbers are noisy.
BUSY_LOAD = 0.5


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spread:
    """Mean, median, 99th percentile (nearest rank), min, max and standard deviation."""

    mean: float
    median: float
    p99: float
    min: float
    max: float
    stdev: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = sorted(float(v) for v in values)
        if not data:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        p99 = data[max(0, math.ceil(0.99 * len(data)) - 1)]
        return cls(statistics.fmean(data), statistics.median(data), p99, data[0], data[-1],
                   statistics.pstdev(data), len(data))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class ItemMeasurement(NamedTuple):
    """One sampled item in the serial pass (sizes in bytes, times in seconds)."""

    position: int  # in the sample; -1 for the warm-up call
    wall: float  # in the worker, around the call
    cpu: float  # process CPU time in the worker (all its threads) during the call
    rss_before: int | None
    rss_peak: int | None  # peak RSS of the worker during the call (None: not measurable)
    bytes_in: int  # the item, pickled
    bytes_out: int  # the result, pickled
    round_trip: float  # in the parent: submit until the answer is back
    error: str | None  # "TypeName: message" when the item failed
    faults: int = 0  # minor page faults in the worker during the call (fresh memory touched)

    @property
    def rss_growth(self) -> int | None:
        if self.rss_peak is None or self.rss_before is None:
            return None
        return max(0, self.rss_peak - self.rss_before)


@dataclasses.dataclass(frozen=True, slots=True)
class SerialPass:
    """The stage run on each sampled item alone, in one fresh worker."""

    items: tuple[ItemMeasurement, ...]
    warmup: ItemMeasurement  # the first item once more, first: imports and caches land here
    wall: Spread
    cpu: Spread
    rss_growth: Spread  # peak RSS during an item - RSS just before it
    bytes_in: Spread
    bytes_out: Spread
    worker_baseline_rss: int  # a fresh worker, before the stage was imported
    worker_baseline_uss: int  # the same, unique to the worker (what one more worker costs)
    worker_peak_rss: int  # the worker's peak over the whole pass (the stage imported, all items)
    overhead: float  # median round trip - wall: the cost of one submit, both ways
    blas_threads: dict[str, Any]
    peak_measured: bool  # False where the peak RSS could not be reset per item
    faults: Spread  # minor page faults per item
    kept_malloc_wall: Spread | None  # wall per item again, malloc keeping big blocks (see notes)

    @property
    def ok(self) -> list[ItemMeasurement]:
        return [m for m in self.items if m.error is None]

    @property
    def failed(self) -> list[ItemMeasurement]:
        return [m for m in self.items if m.error is not None]

    @property
    def peak_growth(self) -> int:
        """How far the worker grew over its fresh baseline: stage import plus the worst item."""
        return max(0, self.worker_peak_rss - self.worker_baseline_rss)

    @property
    def slowest(self) -> float:
        return max([self.warmup.wall, *(m.wall for m in self.ok)])


@dataclasses.dataclass(frozen=True, slots=True)
class SweepRun:
    """One configuration measured through the engine."""

    workers: int
    chunk_size: int
    items: int
    ok: int
    wall: float
    busy: float  # seconds the workers spent inside the stage (from the engine's stats)
    throughput: float  # successful items per second
    speedup: float  # throughput x serial seconds per item
    efficiency: float  # speedup / workers
    ipc_share: float  # (wall x workers - busy) / (wall x workers): pickling, pipes, waiting
    durations: Spread  # per-item durations in the workers (a sample of up to 4096)
    cpu_percent: float | None  # mean sampled CPU % per worker during the run
    peak_rss: int | None  # largest sampled worker RSS during the run
    started: float  # seconds since the profile started
    ended: float
    label: str
    rounds: tuple[float, ...] = ()  # throughput of every round; the fields above are the fastest
    # CPU the workers got while inside items, as a share of what the stage uses alone (serial
    # CPU/wall): under 1 when other processes took the CPUs. None when not measurable.
    cpu_share: float | None = None
    adjusted: float = 0.0  # throughput / cpu_share (floored): what a quiet machine would give

    @property
    def spread(self) -> float:
        """How much slower the slowest round was than the fastest (0.0: identical rounds)."""
        fastest = max(self.rounds, default=0.0)
        return 1 - min(self.rounds) / fastest if fastest > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["durations"] = self.durations.to_dict()
        return out


class WorkerSample(NamedTuple):
    """One reading of one worker by the sampler."""

    t: float  # seconds since the profile started
    run: str | None  # label of the run in progress, None between runs
    pid: int
    cpu_percent: float | None  # since this pid's previous reading (None on the first)
    rss: int | None


@dataclasses.dataclass(frozen=True)
class StageProfile:
    """What :func:`profile_stage` measured and what it recommends.

    ``recommended`` is ready for ``Engine(**profile.recommended)`` (``workers``, ``chunk_size``,
    ``mem_per_task``, ``timeout``); ``reasons`` says why, one entry per key. ``limited_by`` names
    what stops more workers from paying: ``"cpu"``, ``"memory"``, ``"env"``
    (``STAGEPOOL_MAX_WORKERS``), ``"workers"`` (the counts you asked for), ``"ipc"`` (pickling and
    pipes: the parent cannot feed more workers) or ``"contention"`` (items slow each other down:
    memory bandwidth, caches, threads).
    """

    stage: str
    recommended: dict[str, Any]
    reasons: dict[str, str]
    limited_by: str
    mem_per_task: int
    serial: SerialPass
    runs: tuple[SweepRun, ...]
    confirmation: SweepRun | None
    samples: tuple[WorkerSample, ...]
    machine: dict[str, Any]
    sampler_cpu_share: float  # CPU time of the sampler thread / wall time of the sweep
    notes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()

    @property
    def chosen(self) -> SweepRun:
        """The sweep run the recommendation was taken from."""
        rec = self.recommended
        return next(r for r in self.runs
                    if r.workers == rec["workers"] and r.chunk_size == rec["chunk_size"])

    @property
    def expected_throughput(self) -> float:
        """Items per second of the recommendation (confirmed when the confirmation ran)."""
        run = self.confirmation or self.chosen
        return run.adjusted

    def config(self) -> dict[str, Any]:
        """The content of ``profile.json``: the recommendation, its reasons, and context."""
        return {
            "format": PROFILE_FORMAT,
            "stage": self.stage,
            "recommended": dict(self.recommended),
            "reasons": dict(self.reasons),
            "limited_by": self.limited_by,
            "expected_throughput": _finite(self.expected_throughput),
            "machine": dict(self.machine),
        }

    def measurements(self) -> dict[str, Any]:
        """The content of ``measurements.json``: everything measured."""
        s = self.serial
        serial = {
            "items": [dict(m._asdict(), rss_growth=m.rss_growth) for m in s.items],
            "warmup": dict(s.warmup._asdict(), rss_growth=s.warmup.rss_growth),
            **{name: getattr(s, name).to_dict()
               for name in ("wall", "cpu", "rss_growth", "bytes_in", "bytes_out")},
            "worker_baseline_rss": s.worker_baseline_rss,
            "worker_baseline_uss": s.worker_baseline_uss,
            "worker_peak_rss": s.worker_peak_rss,
            "peak_growth": s.peak_growth,
            "overhead": s.overhead,
            "blas_threads": s.blas_threads,
            "peak_measured": s.peak_measured,
            "faults": s.faults.to_dict(),
            "kept_malloc_wall": None if s.kept_malloc_wall is None else s.kept_malloc_wall.to_dict(),
        }
        out: dict[str, Any] = _finite({
            **self.config(),
            "mem_per_task_bytes": self.mem_per_task,
            "serial": serial,
            "runs": [r.to_dict() for r in self.runs],
            "confirmation": None if self.confirmation is None else self.confirmation.to_dict(),
            "sampler": {"interval": SAMPLE_INTERVAL, "cpu_share": self.sampler_cpu_share,
                        "samples": [s._asdict() for s in self.samples]},
            "notes": list(self.notes),
        })
        return out

    def summary(self) -> str:
        """A human report: the serial pass, one table row per run, the recommendation."""
        return "\n".join(_summary_lines(self))

    def __str__(self) -> str:
        return self.summary()

    def write(self, out: str | os.PathLike[str], *, say: Callable[[str], None] | None = None,
              ) -> StageProfile:
        """Write profile.json, measurements.json and the plots into ``out``; return a copy of
        this profile whose ``files`` lists what was written. Creates ``out`` if needed."""
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        files = [directory / "profile.json", directory / "measurements.json"]
        files[0].write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        files[1].write_text(json.dumps(self.measurements(), indent=1) + "\n", encoding="utf-8")
        plots, note = _plot(self, directory)
        if note and say is not None:
            say(note)
        notes = self.notes + ((note,) if note else ())
        return dataclasses.replace(self, files=tuple(files + plots), notes=notes)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def profile_stage(
    fn: Callable[[Any], Any],
    sample: Iterable[Any],
    *,
    workers: int | Sequence[int] | None = None,
    chunk_sizes: Sequence[int] | None = None,
    mem_limit: int | str | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    run_seconds: float = 1.0,
    repeat: int = 3,
) -> StageProfile:
    """Measure ``fn`` on ``sample`` and recommend the ``Engine`` settings for it.

    ``fn`` must be picklable (a module-level function), as for :meth:`Engine.map`. ``sample`` is
    read once into a list: a few to a few dozen representative items. Items that fail in the
    serial pass are reported and left out of the sweep.

    ``workers``: the worker counts to try: a sequence, or an int N for 1 .. N (powers of two
    and N above 8); default 1 .. the usable CPUs. Counts you ask for may oversubscribe the CPUs
    (for a stage that mostly waits); none ever exceeds what the memory budget allows.
    ``chunk_sizes``: the chunk sizes to try; default up to 5 sizes from 1 to ~0.5 s of work per
    chunk. ``mem_limit``: the memory the workers may use together (bytes or a size such as
    ``"4GiB"``); default what the machine (or its cgroup) has available now. ``run_seconds``: the
    target length of each sweep run; ``repeat``: rounds over every configuration, of which the
    fastest counts (other load on the machine only ever slows a run down). ``progress``: print
    what is happening to stderr. ``out``: a directory to write ``profile.json``,
    ``measurements.json`` and PNG plots into.

    Raises ``ValueError`` / ``TypeError`` naming the argument for bad arguments, ``ValueError``
    when the sample is empty or every sampled item fails.

    Cancellation: a ``KeyboardInterrupt`` propagates; the engine in use is shut down (its workers
    killed) and the sampler thread stopped before it leaves this function. Nothing is written.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if isinstance(run_seconds, bool) or not isinstance(run_seconds, int | float) or run_seconds <= 0:
        raise ValueError(f"run_seconds must be > 0 seconds, got {run_seconds!r}")
    check_positive_int(repeat, "repeat")
    sizes = _check_chunk_sizes(chunk_sizes)
    counts = _check_workers(workers)
    budget = None if mem_limit is None else _positive_size(mem_limit, "mem_limit")
    items = list(sample)
    if not items:
        raise ValueError("sample is empty: give at least one item to profile the stage on")
    say = _Say(progress)
    started = time.perf_counter()
    snapshot = ResourceSnapshot.read()
    load = _load_average()
    stage = _stage_name(fn)
    say(f"{stage}: serial pass on {len(items)} items in one worker")
    serial = _serial_pass(fn, items, say)
    good = [item for item, m in zip(items, serial.items, strict=True) if m.error is None]
    if not good:
        raise ValueError(f"every sampled item failed in {stage}; the first: {serial.items[0].error}")
    say(_serial_line(serial))
    plan = _plan_sweep(serial, snapshot, budget=budget, counts=counts, sizes=sizes,
                       run_seconds=run_seconds, repeat=repeat)
    for note in plan.notes:
        say(note)
    runs, rec, confirmation, sampler = _sweep_and_confirm(fn, good, serial, plan, say, started)
    samples = sampler.samples
    profile = StageProfile(
        stage=stage, recommended=rec.kwargs, reasons=rec.reasons, limited_by=rec.limited_by,
        mem_per_task=rec.mem_per_task, serial=serial,
        runs=tuple(runs),
        confirmation=confirmation, samples=tuple(samples),
        machine=_machine(snapshot, budget, load), sampler_cpu_share=sampler.cpu_share,
        notes=(*_load_note(load, snapshot), *_noise_note(runs, plan), *plan.notes,
               *_failure_notes(serial), *_waiting_note(serial, rec), *_malloc_note(serial)))
    if out is not None:
        profile = profile.write(out, say=say)
        say("wrote " + ", ".join(str(f) for f in profile.files))
    return profile


def _sweep_and_confirm(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass,
                       plan: _SweepPlan, say: _Say, started: float,
                       ) -> tuple[list[SweepRun], _Recommendation, SweepRun, _Sampler]:
    """The parallel sweep, the recommendation, and ``Engine(**recommended)`` measured, all while
    the sampler watches the workers."""
    with _Sampler(started) as sampler:
        runs = _sweep(fn, good, serial, plan, say, sampler)
        rec = _recommend(runs, serial, plan)
        say(f"recommended: Engine({_kwargs_text(rec.kwargs)}), limited by {rec.limited_by}; "
            "confirming")
        confirmation = _confirm(fn, good, serial, plan, rec.kwargs, "recommended", sampler)
        if _timeout_may_cost(rec, confirmation, serial):
            say("the timeout seems to cost throughput: confirming without it")
            untimed = _confirm(fn, good, serial, plan, {**rec.kwargs, "timeout": None},
                               "recommended, no timeout", sampler)
            if untimed.adjusted > confirmation.adjusted * (1 + TIMEOUT_COST):
                rec, confirmation = _drop_timeout(rec, confirmation, untimed), untimed
    say(f"confirmed: {_rate(confirmation)} items/s (sweep {_rate(rec.chosen)}, best "
        f"{max(r.adjusted for r in runs):.4g})")
    return runs, rec, confirmation, sampler


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_workers(workers: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if workers is None:
        return None
    if isinstance(workers, int) and not isinstance(workers, bool):
        check_positive_int(workers, "workers")
        return _default_counts(workers)
    if isinstance(workers, str) or not isinstance(workers, Sequence) or not workers:
        raise TypeError(f"workers must be an int >= 1, a non-empty sequence of them, or None; "
                        f"not {workers!r}")
    for count in workers:
        check_positive_int(count, "workers")
    return tuple(sorted(set(workers)))


def _check_chunk_sizes(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    if isinstance(sizes, str) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(f"chunk_sizes must be a non-empty sequence of ints >= 1, not {sizes!r}")
    for size in sizes:
        if validate_chunk_size(size, name="chunk_sizes") is None:
            raise ValueError("chunk_sizes must be ints >= 1: the profiler measures fixed sizes")
    return tuple(sorted(set(sizes)))


def _positive_size(value: int | str, name: str) -> int:
    size = parse_size(value, name=name)
    if size <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    return size


def _stage_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}"


# --------------------------------------------------------------------------------------------------
# Targets for the command line: "MODULE:FUNCTION" and an items factory
# --------------------------------------------------------------------------------------------------


class TargetError(ValueError):
    """A ``MODULE:NAME`` target that cannot be used; the message says why and what to check."""


def resolve_target(spec: str, *, what: str = "stage") -> Callable[..., Any]:
    """Import ``MODULE:NAME`` (NAME may be dotted) and return it; it must be callable.

    Raises :class:`TargetError` (a ``ValueError``) with a message fit for a command line: a bad
    format, no such module, a module that raises on import, no such attribute, not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"the {what} must look like MODULE:NAME "
                          f"(e.g. stagepool.demo:process_segment), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise TargetError(f"the {what} {spec!r}: no module named {exc.name!r}; check the "
                              "spelling, and that it is importable from the current directory "
                              "or PYTHONPATH") from None
        raise TargetError(f"the {what} {spec!r}: importing {module_name!r} failed: "
                          f"{exc}") from None
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {what} {spec!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"the {what} {spec!r}: module {module_name!r} has no attribute "
                              f"{attr!r}") from None
    if not callable(obj):
        raise TargetError(f"the {what} {spec!r} is not callable: it is a {type(obj).__name__}")
    return obj  # type: ignore[no-any-return]


def sample_from_factory(factory: Callable[[], Any], count: int, *, name: str = "items factory",
                        ) -> list[Any]:
    """Call ``factory()`` and take the first ``count`` items of what it returns.

    Raises :class:`TargetError` when the factory raises (while called or while iterated), returns
    something that is not iterable, or produces no item.
    """
    check_positive_int(count, "sample")
    try:
        produced = factory()
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {name} raised {type(exc).__name__}: {exc}") from None
    try:
        iterator = iter(produced)
    except TypeError:
        raise TargetError(f"the {name} returned a {type(produced).__name__}, which is not "
                          "iterable; it must return an iterable of items") from None
    try:
        items = list(itertools.islice(iterator, count))
    except (Exception, SystemExit) as exc:
        raise TargetError(f"the {name} raised {type(exc).__name__} while producing items: "
                          f"{exc}") from None
    if not items:
        raise TargetError(f"the {name} produced no items")
    return items


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


class _Say:
    """Progress lines on stderr ("profile: ..."); on a terminal also an in-place item counter."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and self.stream.isatty()
        self._ticking = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self._ticking:
            self.stream.write("\r\x1b[K")
            self._ticking = False
        print(f"profile: {message}", file=self.stream, flush=True)

    def tick(self, message: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[Kprofile: {message}")
            self.stream.flush()
            self._ticking = True


# --------------------------------------------------------------------------------------------------
# The serial pass (what runs in the worker is in _probe: see there why)
# --------------------------------------------------------------------------------------------------


def _worker_facts(engine: Engine) -> dict[str, Any]:
    """The probe's facts about the engine's one worker, and its USS: psutil reads that from here,
    by pid, so that the probe (and the worker measured) never imports psutil."""
    facts = engine.submit(worker_facts, THREAD_ENV_VARS).result()
    return {**facts, "uss": uss_of(facts["pid"]) or 0}


def _serial_pass(fn: Callable[[Any], Any], items: list[Any], say: _Say) -> SerialPass:
    with Engine(workers=1) as engine:
        fresh = _worker_facts(engine)
        warmup = _measure_one(engine, fn, items[0], -1)
        measured: list[ItemMeasurement] = []
        for index, item in enumerate(items):
            say.tick(f"serial pass {index + 1}/{len(items)}")
            measured.append(_measure_one(engine, fn, item, index))
        final = _worker_facts(engine)
        tuned = _malloc_experiment(engine, fn, items, measured, say)
    ok = [m for m in measured if m.error is None] or [warmup]
    growth = [g for g in (m.rss_growth for m in ok) if g is not None]
    peaks = [m.rss_peak for m in [warmup, *measured] if m.rss_peak is not None]
    return SerialPass(
        items=tuple(measured), warmup=warmup,
        wall=Spread.of(m.wall for m in ok), cpu=Spread.of(m.cpu for m in ok),
        rss_growth=Spread.of(growth), bytes_in=Spread.of(m.bytes_in for m in ok),
        bytes_out=Spread.of(m.bytes_out for m in ok),
        worker_baseline_rss=int(fresh["rss"]), worker_baseline_uss=int(fresh["uss"]),
        worker_peak_rss=max([int(final["rss"]), *peaks]),
        overhead=max(0.0, statistics.median(m.round_trip - m.wall for m in [warmup, *measured])),
        blas_threads=dict(final["blas"]), peak_measured=bool(peaks),
        faults=Spread.of(m.faults for m in ok), kept_malloc_wall=tuned)


def _malloc_experiment(engine: Engine, fn: Callable[[Any], Any], items: list[Any],
                       measured: list[ItemMeasurement], say: _Say) -> Spread | None:
    """Items that page-fault a lot: time a few again once malloc keeps its big blocks.

    glibc hands blocks over its mmap threshold back to the system when they are freed, so a
    stage with big temporaries touches fresh pages (and pays a fault for each) on every item.
    """
    ok = [(item, m) for item, m in zip(items, measured, strict=True) if m.error is None]
    if not ok or statistics.fmean(m.faults for _, m in ok) * PAGE_BYTES < FAULT_NOTE_BYTES:
        return None
    if not engine.submit(keep_malloc_memory).result():
        return None
    mean = statistics.fmean(m.wall for _, m in ok)
    count = max(2, min(8, int(MALLOC_EXPERIMENT_SECONDS / max(mean, 1e-9))))
    say.tick("serial pass: timing items again with malloc keeping its memory")
    _measure_one(engine, fn, ok[0][0], -1)  # the first one grows the heap: not counted
    again = [_measure_one(engine, fn, item, m.position) for item, m in ok[:count]]
    walls = [m.wall for m in again if m.error is None]
    return Spread.of(walls) if walls else None


def _measure_one(engine: Engine, fn: Callable[[Any], Any], item: Any, index: int,
                 ) -> ItemMeasurement:
    try:
        bytes_in = len(dumps(item))
    except Exception as exc:
        return ItemMeasurement(index, 0.0, 0.0, None, None, 0, 0, 0.0,
                               f"the item cannot be pickled: {type(exc).__name__}: {exc}")
    start = time.perf_counter()
    try:
        wall, cpu, before, peak, size, error, faults = engine.submit(
            measure_item, fn, item).result()
    except Exception as exc:  # the worker crashed, or the function could not be shipped
        return ItemMeasurement(index, time.perf_counter() - start, 0.0, None, None, bytes_in, 0,
                               time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return ItemMeasurement(index, wall, cpu, before, peak, bytes_in, size,
                           time.perf_counter() - start, error, faults)


# --------------------------------------------------------------------------------------------------
# Planning the sweep (pure)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _SweepPlan:
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    run_seconds: float
    repeat: int
    bound: str  # what capped the worker counts: cpu, memory, env or workers
    budget: int  # bytes the workers may use together
    budget_source: str
    usable_cpus: int
    notes: tuple[str, ...]


def chunk_candidates(per_item: float, *, limit: int = MAX_CHUNK_CANDIDATES) -> tuple[int, ...]:
    """Chunk sizes worth trying for items of ``per_item`` seconds: powers of two from 1 up to
    ~``MAX_CHUNK_SECONDS`` of work, thinned to ``limit`` geometrically spread sizes that always
    include 1 and the largest. (A run grows to give each worker MIN_CHUNKS_PER_WORKER chunks.)"""
    top = max(1, min(1 << 16, int(MAX_CHUNK_SECONDS / max(per_item, 1e-7))))
    powers = [1 << k for k in range(top.bit_length())]
    stride = max(1, math.ceil((len(powers) - 1) / max(1, limit - 1)))
    picked = sorted(set(powers[::-1][::stride]) | {1})
    return tuple(picked)


def _default_counts(cap: int) -> tuple[int, ...]:
    if cap <= 8:
        return tuple(range(1, cap + 1))
    return tuple(sorted({1 << k for k in range(cap.bit_length()) if 1 << k < cap} | {cap}))


def _mem_per_task(serial: SerialPass, chunk: int, sampled_growth: int = 0) -> int:
    """Bytes to reserve per worker: its own baseline, its peak growth, a chunk in and out."""
    payload = int(serial.bytes_in.max + serial.bytes_out.max)
    need = serial.worker_baseline_uss + max(serial.peak_growth, sampled_growth) + chunk * payload
    return _round_up_mib(need * MEM_SAFETY)


def _round_up_mib(n: float) -> int:
    """Round a byte count up to two significant digits in MiB (at least 1 MiB)."""
    mib = max(1.0, n / 2**20)
    step = 10 ** max(0, math.floor(math.log10(mib)) - 1)
    return int(math.ceil(mib / step) * step) * 2**20


def _plan_sweep(serial: SerialPass, snapshot: ResourceSnapshot, *, budget: int | None,
                counts: tuple[int, ...] | None, sizes: tuple[int, ...] | None,
                run_seconds: float, repeat: int = 1) -> _SweepPlan:
    available = snapshot.effective_mem_available
    source = "--mem-limit" if budget is not None else "available now"
    usable = min(budget, available) if budget is not None else available
    per_task = _mem_per_task(serial, 1)
    bounds: list[tuple[str, int]] = [("cpu", snapshot.usable_cpus),
                                     ("memory", max(1, usable // per_task))]
    if snapshot.env_max_workers is not None:
        bounds.append(("env", snapshot.env_max_workers))
    bound, cap = min(bounds, key=lambda b: b[1])  # min() keeps the first of ties: cpu first
    notes: list[str] = []
    if counts is not None:  # as asked, CPUs may be oversubscribed, but memory is a hard limit
        hard_name, hard = min(((k, v) for k, v in bounds if k != "cpu"), key=lambda b: b[1])
        chosen = tuple(c for c in counts if c <= hard) or (1,)
        if len(chosen) < len(counts):
            bound = hard_name
            notes.append(f"worker counts over {hard} were left out: {hard_name} allows {hard}")
        else:
            bound = "cpu" if max(chosen) == snapshot.usable_cpus else "workers"
        if max(chosen) > snapshot.usable_cpus:
            notes.append(f"trying up to {max(chosen)} workers on {snapshot.usable_cpus} usable "
                         "CPUs, as asked: the CPUs are oversubscribed")
    else:
        chosen = _default_counts(cap)
    per_item = max(serial.wall.mean, 1e-7)
    return _SweepPlan(
        counts=chosen, sizes=sizes or chunk_candidates(per_item),
        run_seconds=run_seconds, repeat=repeat, bound=bound,
        budget=budget if budget is not None else available,
        budget_source=source, usable_cpus=snapshot.usable_cpus, notes=tuple(notes))


def _items_per_run(serial: SerialPass, workers: int, chunk: int, run_seconds: float) -> int:
    """Items for a run of about ``run_seconds``: each costs its time plus 1/chunk of a round trip,
    spread over the workers; never fewer than MIN_CHUNKS_PER_WORKER chunks per worker."""
    per_item = (serial.wall.mean + serial.overhead / chunk) / workers
    n = math.ceil(run_seconds / max(per_item, 1e-8))
    return int(min(MAX_RUN_ITEMS, max(n, MIN_CHUNKS_PER_WORKER * workers * chunk)))


def _distinct_pool(items: list[Any], size: int, serial: SerialPass) -> list[Any]:
    """``items``, plus copies up to ``size`` objects, so no chunk of ``size`` repeats an object."""
    if size <= len(items):
        return items
    per_item = max(1.0, serial.bytes_in.mean)
    size = min(size, max(len(items), int(MAX_COPY_BYTES / per_item)))
    blobs = [dumps(item) for item in items]
    return items + [pickle.loads(blobs[i % len(blobs)]) for i in range(len(items), size)]


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


class _Sampler:
    """A thread reading CPU % and RSS of the watched engine's workers every SAMPLE_INTERVAL.

    It sleeps on an Event between readings and reads two small /proc files per worker, so it
    costs well under 1 % of one CPU; that cost is measured (``cpu_seconds``) and reported.
    """

    def __init__(self, t0: float, interval: float = SAMPLE_INTERVAL) -> None:
        self.t0, self.interval = t0, interval
        self.samples: list[WorkerSample] = []
        self.cpu_seconds = self.wall = self._started = 0.0
        self._read = cpu_rss_sampler()
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._label: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stagepool-profile-sampler",
                                        daemon=True)

    def __enter__(self) -> _Sampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.wall = time.perf_counter() - self._started

    @property
    def cpu_share(self) -> float:
        """CPU time of the sampler thread over its lifetime, as a share of one CPU."""
        return self.cpu_seconds / max(self.wall, 1e-9)

    def watch(self, engine: Engine | None, label: str | None = None) -> None:
        with self._lock:
            self._engine, self._label = engine, label

    def _loop(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            with self._lock:
                engine, label = self._engine, self._label
            if engine is None:
                continue
            now = time.perf_counter() - self.t0
            for pid, cpu, rss in self._read(engine.worker_pids()):
                self.samples.append(WorkerSample(now, label, pid, cpu, rss))
            self.cpu_seconds = time.thread_time() - start


def _sweep(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass, plan: _SweepPlan,
           say: _Say, sampler: _Sampler) -> list[SweepRun]:
    """Every (workers, chunk size) ``plan.repeat`` times; the fastest round of each counts.

    Each round goes over all configurations, in reverse order every other round, so that a burst
    of other load or a slow drift hits every configuration alike rather than one of them. Every
    run has a fresh engine (see ``_fresh_run``); no more workers are alive than the largest count.
    A configuration whose every round was disturbed (see ``_disturbed``) runs once more; its
    throughput is also adjusted for the CPU it did not get (see ``_with_samples``).
    """
    total = len(plan.counts) * len(plan.sizes) * plan.repeat
    say(f"sweep: {len(plan.counts)} worker counts {list(plan.counts)} x {len(plan.sizes)} chunk "
        f"sizes {list(plan.sizes)} x {plan.repeat} rounds, ~{plan.run_seconds:g} s each (about "
        f"{total * plan.run_seconds:.0f} s plus pool starts)")
    pool = _distinct_pool(good, max(plan.sizes), serial)
    done: dict[tuple[int, int], list[SweepRun]] = {}

    def measure(workers: int, chunk: int, label: str) -> None:
        n = _items_per_run(serial, workers, chunk, plan.run_seconds)
        step = f"[{sum(map(len, done.values())) + 1}/{total}]"
        say.tick(f"{step} {workers} workers, chunk {chunk}, {n} items ...")
        run = _fresh_run(fn, good, pool, n, workers, chunk, label, serial, sampler)
        done.setdefault((workers, chunk), []).append(run)
        say(f"{step} {_run_line(run)}{' (disturbed)' if _disturbed(run, serial) else ''}")

    for round_ in range(plan.repeat):
        flip = -1 if round_ % 2 else 1
        for workers in plan.counts[::flip]:
            for chunk in plan.sizes[::flip]:
                measure(workers, chunk, f"w{workers} c{chunk} r{round_ + 1}")
    for (workers, chunk), runs in list(done.items()):
        if all(_disturbed(r, serial) for r in runs):
            total += 1
            measure(workers, chunk, f"w{workers} c{chunk} r{len(runs) + 1}")
    return [_fastest(done[(w, c)]) for w in plan.counts for c in plan.sizes]


def _disturbed(run: SweepRun, serial: SerialPass) -> bool:
    """Did other processes take the CPUs from this run's workers? (See ``_cpu_share``.)"""
    return run.cpu_share is not None and run.cpu_share < DISTURBED_SHARE


def _fresh_run(fn: Callable[[Any], Any], good: list[Any], pool: list[Any], n: int, workers: int,
               chunk: int, label: str, serial: SerialPass, sampler: _Sampler) -> SweepRun:
    """One run in an engine of its own, as ``Engine(workers=..., chunk_size=...)`` would start.

    Not one engine per worker count reused across chunk sizes: a worker's history changes its
    speed. After one big chunk, glibc's malloc raises its mmap threshold for good and the stage's
    large temporary arrays stop costing page faults (a third of the demo stage's time here), so a
    small chunk size measured after a big one would look faster than it ever is on its own.
    """
    with Engine(workers=workers) as engine:
        sampler.watch(engine)
        _warm_up(engine, fn, good, workers)
        run = _timed_run(engine, fn, pool, n, chunk, label, serial, sampler)
        sampler.watch(None)
    return _with_samples(run, list(sampler.samples), serial)


def _fastest(rounds: Sequence[SweepRun]) -> SweepRun:
    best = max(rounds, key=lambda r: r.adjusted)
    return dataclasses.replace(best, rounds=tuple(r.throughput for r in rounds))


def _warm_up(engine: Engine, fn: Callable[[Any], Any], good: list[Any], workers: int) -> None:
    """A few items per worker first: imports, caches and first-call costs stay out of the runs."""
    items = [good[i % len(good)] for i in range(2 * workers)]
    engine.map(fn, items, chunk_size=1)


def _timed_run(engine: Engine, fn: Callable[[Any], Any], pool: list[Any], n: int, chunk: int,
               label: str, serial: SerialPass, sampler: _Sampler) -> SweepRun:
    workers = engine.workers
    items = [pool[i % len(pool)] for i in range(n)]
    sampler.watch(engine, label)
    start = time.perf_counter() - sampler.t0
    report = engine.map(fn, items, chunk_size=chunk)
    end = time.perf_counter() - sampler.t0
    sampler.watch(engine)
    stats = report.stats
    wall = max(stats.wall_time, 1e-9)
    ok = len(report) - len(report.failed)
    throughput = ok / wall
    speedup = throughput * serial.wall.mean
    step = max(1, len(report) // 4096)
    picked = (report[i] for i in range(0, len(report), step))
    durations = Spread.of(outcome.duration for outcome in picked if outcome.ok)
    return SweepRun(
        workers=workers, chunk_size=chunk, items=n, ok=ok, wall=wall, busy=stats.busy_time,
        throughput=throughput, speedup=speedup, efficiency=speedup / workers,
        ipc_share=max(0.0, (wall * workers - stats.busy_time) / (wall * workers)),
        durations=durations, cpu_percent=None, peak_rss=None, started=start, ended=end,
        label=label, adjusted=throughput)


def _with_samples(run: SweepRun, samples: Sequence[WorkerSample], serial: SerialPass) -> SweepRun:
    """The run with its sampled CPU % and peak RSS, and its throughput adjusted for the CPU its
    workers did not get (see ``_cpu_share``)."""
    mine = [s for s in samples if s.run == run.label]
    cpus = [s.cpu_percent for s in mine if s.cpu_percent is not None]
    rss = [s.rss for s in mine if s.rss is not None]
    run = dataclasses.replace(run, cpu_percent=statistics.fmean(cpus) if cpus else None,
                              peak_rss=max(rss) if rss else None)
    share = _cpu_share(run, serial)
    adjusted = run.throughput / max(MIN_CPU_SHARE, share) if share is not None else run.throughput
    return dataclasses.replace(run, cpu_share=share, adjusted=max(run.throughput, adjusted))


def _cpu_share(run: SweepRun, serial: SerialPass) -> float | None:
    """CPU the workers got while inside items / what the stage uses alone, capped at 1.

    For a CPU-bound stage (CPU/wall near 1 in the serial pass) a worker inside an item uses a
    whole CPU; when the sampled CPU % is under the share of time spent inside items, other
    processes had the CPUs. None for stages that wait, or without samples.
    """
    ratio = _cpu_ratio(serial)
    if ratio is None or ratio < 0.8 or run.cpu_percent is None:
        return None
    inside = run.busy / max(run.wall * run.workers, 1e-9)
    if inside <= 0:
        return None
    return min(1.0, run.cpu_percent / 100 / (inside * min(1.0, ratio)))


def _confirm(fn: Callable[[Any], Any], good: list[Any], serial: SerialPass, plan: _SweepPlan,
             kwargs: dict[str, Any], label: str, sampler: _Sampler) -> SweepRun:
    """Run ``Engine(**kwargs)`` exactly as configured, measured like a sweep run."""
    workers, chunk = kwargs["workers"], kwargs["chunk_size"]
    pool = _distinct_pool(good, chunk, serial)
    n = _items_per_run(serial, workers, chunk, plan.run_seconds)
    with Engine(**kwargs) as engine:
        sampler.watch(engine)
        _warm_up(engine, fn, good, workers)
        rounds: list[SweepRun] = []
        while len(rounds) < plan.repeat or (
                all(_disturbed(r, serial) for r in rounds) and len(rounds) == plan.repeat):
            run = _timed_run(engine, fn, pool, n, chunk, f"{label} r{len(rounds) + 1}", serial,
                             sampler)
            rounds.append(_with_samples(run, list(sampler.samples), serial))
        sampler.watch(None)
    return _fastest(rounds)


# --------------------------------------------------------------------------------------------------
# The recommendation (pure)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Recommendation:
    kwargs: dict[str, Any]
    reasons: dict[str, str]
    limited_by: str
    mem_per_task: int
    chosen: SweepRun


def recommend_timeout(p99: float, slowest: float) -> tuple[float, str]:
    """A per-item timeout from the duration distribution, and its reason.

    ``max(p99 x TIMEOUT_P99_FACTOR, slowest x TIMEOUT_SLOWEST_FACTOR, TIMEOUT_FLOOR)``, rounded up
    to two significant digits: always above the slowest item seen, so only a real hang trips it.
    """
    candidates = [(p99 * TIMEOUT_P99_FACTOR, f"p99 item {_secs(p99)} x {TIMEOUT_P99_FACTOR:g}"),
                  (slowest * TIMEOUT_SLOWEST_FACTOR,
                   f"{TIMEOUT_SLOWEST_FACTOR:g} x the slowest sampled item ({_secs(slowest)})"),
                  (TIMEOUT_FLOOR, f"the {TIMEOUT_FLOOR:g} s floor (a timeout kills and respawns "
                                  "the worker: below that, a GC pause or a busy machine trips it)")]
    value, why = max(candidates, key=lambda c: c[0])
    timeout = _round_up_2sig(value)
    others = "; ".join(text for v, text in candidates if text != why)
    return timeout, f"{timeout:g} s from {why} (also considered: {others})"


def _round_up_2sig(x: float) -> float:
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(round(math.ceil(x / step - 1e-9) * step, 10))


def _recommend(runs: Sequence[SweepRun], serial: SerialPass, plan: _SweepPlan) -> _Recommendation:
    sampled = {c: max([0, *((r.peak_rss or 0) - serial.worker_baseline_rss
                            for r in runs if r.chunk_size == c)]) for c in plan.sizes}
    mem = {c: _mem_per_task(serial, c, sampled.get(c, 0)) for c in plan.sizes}

    def fits(run: SweepRun) -> bool:
        return run.workers == 1 or run.workers * mem[run.chunk_size] <= plan.budget

    usable = [r for r in runs if r.ok > 0 and fits(r)] or [r for r in runs if r.ok > 0]
    if not usable:
        raise ValueError("no sweep run finished any item: every item failed in the engine")
    best = max(usable, key=lambda r: r.adjusted)
    near = [r for r in usable if r.adjusted >= best.adjusted * (1 - TOLERANCE)]
    chosen = min(near, key=lambda r: (r.workers, r.chunk_size))
    per_task = mem[chosen.chunk_size]
    limited_by = _limited_by(chosen, usable, plan)
    p99 = max(serial.wall.p99, chosen.durations.p99)
    slowest = max(serial.slowest, chosen.durations.max)
    timeout, timeout_reason = recommend_timeout(p99, slowest)
    kwargs: dict[str, Any] = {"workers": chosen.workers, "chunk_size": chosen.chunk_size,
                              "mem_per_task": f"{per_task // 2**20}MiB", "timeout": timeout}
    reasons = {
        "workers": _workers_reason(chosen, usable, limited_by, plan, per_task),
        "chunk_size": _chunk_reason(chosen, usable, serial),
        "mem_per_task": _mem_reason(serial, chosen, per_task, sampled.get(chosen.chunk_size, 0),
                                    plan),
        "timeout": timeout_reason,
    }
    return _Recommendation(kwargs, reasons, limited_by, per_task, chosen)


def _timeout_may_cost(rec: _Recommendation, timed: SweepRun, serial: SerialPass) -> bool:
    """A per-item timeout makes the worker read the clock around every item (~0.1-0.5 us): on
    tiny items that shows. Worth a second confirmation without it when the timed one fell short;
    on longer items a shortfall is noise, not the timeout."""
    return (rec.kwargs.get("timeout") is not None
            and serial.wall.mean < TIMED_ITEM_MAX_SECONDS
            and timed.adjusted < rec.chosen.adjusted * (1 - TIMEOUT_COST))


def _drop_timeout(rec: _Recommendation, timed: SweepRun, untimed: SweepRun) -> _Recommendation:
    timeout = rec.kwargs["timeout"]
    cost = 1 - timed.adjusted / untimed.adjusted
    reason = (f"None: with timeout={timeout:g} the engine clocks every item, which cost {cost:.0%} "
              f"of the throughput here ({timed.adjusted:.4g} vs {untimed.adjusted:.4g} "
              f"items/s; items take {_secs(untimed.durations.mean)}); a hang still shows as a "
              f"stalled batch. If you want one anyway: {rec.reasons['timeout']}")
    return dataclasses.replace(rec, kwargs={**rec.kwargs, "timeout": None},
                               reasons={**rec.reasons, "timeout": reason})


def _limited_by(chosen: SweepRun, runs: Sequence[SweepRun], plan: _SweepPlan) -> str:
    most = max(r.workers for r in runs)
    if chosen.workers >= most and plan.bound != "cpu":
        return plan.bound  # memory, env or the counts asked for: a hard stop, whatever else
    if chosen.ipc_share >= IPC_BOUND:
        return "ipc"
    if chosen.workers >= most:
        return "cpu"
    if chosen.workers >= plan.usable_cpus:
        return "cpu"
    at_most = [r for r in runs if r.workers == most]
    fastest = max(at_most, key=lambda r: r.adjusted)
    return "ipc" if fastest.ipc_share >= IPC_BOUND / 2 else "contention"


def _workers_reason(chosen: SweepRun, runs: Sequence[SweepRun], limited_by: str, plan: _SweepPlan,
                    per_task: int) -> str:
    head = (f"{chosen.workers}: {_rate(chosen)} items/s at chunk {chosen.chunk_size}, "
            f"speedup {chosen.speedup:.2f}x over the serial pass, parallel efficiency "
            f"{chosen.efficiency:.2f}")
    if limited_by == "memory":
        return (f"{head}; limited by memory: {format_size(plan.budget)} ({plan.budget_source}) / "
                f"{format_size(per_task)} per task allows {max(1, plan.budget // per_task)}")
    if limited_by == "cpu" and chosen.workers >= max(r.workers for r in runs):
        return f"{head}; limited by cpu: {plan.usable_cpus} usable CPUs, one worker each"
    if limited_by == "ipc" and chosen.workers >= max(r.workers for r in runs):
        return (f"{head}; limited by IPC: the workers wait {chosen.ipc_share:.0%} of the time for "
                "the parent to pickle and ship items and results: more workers cannot help, "
                "bigger items per call (or less data per item) can")
    if limited_by in ("env", "workers"):
        source = "STAGEPOOL_MAX_WORKERS" if limited_by == "env" else "the worker counts asked for"
        return f"{head}; more workers were not tried ({source})"
    more = [r for r in runs if r.workers > chosen.workers]
    faster = max(more, key=lambda r: r.adjusted)
    why = {"cpu": f"only {plan.usable_cpus} usable CPUs",
           "ipc": f"the parent cannot feed them: {faster.ipc_share:.0%} of worker time goes to "
                  "pickling and pipes",
           "contention": _contention_text(faster)}[limited_by]
    gain = faster.adjusted / chosen.adjusted - 1
    return (f"{head}; {faster.workers} workers reached {_rate(faster)} items/s "
            f"({gain:+.0%}; gains under {TOLERANCE:.0%} count as noise): {why}")


def _contention_text(run: SweepRun) -> str:
    """Why more workers did not pay although the parent kept up: the CPUs, or each other."""
    busy = run.busy / max(run.wall * run.workers, 1e-9)  # share of the time inside an item
    if run.cpu_percent is not None and run.cpu_percent < 75 * busy:
        return (f"its workers got only {run.cpu_percent:.0f}% of a CPU each while busy "
                f"{busy:.0%} of the time: other processes were using the CPUs")
    return "items slow each other down when run side by side (memory bandwidth, caches, threads)"


def _chunk_reason(chosen: SweepRun, runs: Sequence[SweepRun], serial: SerialPass) -> str:
    same = sorted((r for r in runs if r.workers == chosen.workers), key=lambda r: r.chunk_size)
    top = max(same, key=lambda r: r.adjusted)
    table = ", ".join(f"{r.chunk_size}: {_rate(r)}" for r in same)
    work = chosen.chunk_size * serial.wall.mean
    return (f"{chosen.chunk_size}: the smallest chunk within {TOLERANCE:.0%} of the best at "
            f"{chosen.workers} workers (chunk {top.chunk_size}: {_rate(top)} items/s); "
            f"~{_secs(work)} of work and {chosen.ipc_share:.0%} of worker time lost to IPC per "
            f"chunk; items/s by chunk size: {table}")


def _mem_reason(serial: SerialPass, chosen: SweepRun, per_task: int, sampled: int,
                plan: _SweepPlan) -> str:
    growth = max(serial.peak_growth, sampled)
    source = "sampled in the sweep" if sampled > serial.peak_growth else "serial pass"
    payload = serial.bytes_in.max + serial.bytes_out.max
    fit = max(1, plan.budget // per_task)
    return (f"{format_size(per_task)}: (worker baseline {format_size(serial.worker_baseline_uss)} "
            f"USS + peak growth {format_size(growth)} ({source}; worst item "
            f"{format_size(serial.rss_growth.max)}) + {chosen.chunk_size} x "
            f"{format_size(payload)} of payload in and out) x {MEM_SAFETY:g}, rounded up; "
            f"{format_size(plan.budget)} ({plan.budget_source}) fits {fit} such workers")


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _secs(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _serial_line(s: SerialPass) -> str:
    return (f"serial: {_secs(s.wall.mean)}/item (p99 {_secs(s.wall.p99)}, max "
            f"{_secs(s.wall.max)}), CPU {_cpu_text(s)}, peak RSS growth "
            f"{format_size(s.rss_growth.max)}/item, payload {format_size(s.bytes_in.mean)} in, "
            f"{format_size(s.bytes_out.mean)} out; {len(s.failed)} of {len(s.items)} failed")


def _cpu_text(s: SerialPass) -> str:
    ratio = _cpu_ratio(s)
    if ratio is None:
        return "n/a (items too short to clock)"
    return f"{_secs(s.cpu.mean)}/item (CPU/wall {ratio:.2f})"


def _rate(run: SweepRun) -> str:
    """Items per second, with the adjusted figure when other processes took CPU from the run."""
    if run.adjusted > run.throughput * 1.02:
        return f"{run.throughput:.4g} (adjusted {run.adjusted:.4g})"
    return f"{run.throughput:.4g}"


def _run_line(run: SweepRun) -> str:
    return (f"{run.workers} workers, chunk {run.chunk_size}: {_rate(run)} items/s over "
            f"{run.items} items, efficiency {run.efficiency:.2f}, IPC {run.ipc_share:.0%}")


def _failure_notes(serial: SerialPass) -> tuple[str, ...]:
    failed = serial.failed
    if not failed:
        return ()
    return (f"{len(failed)} of {len(serial.items)} sampled items failed and were left out of the "
            f"sweep; item {failed[0].position}: {failed[0].error}",)


def _machine(snapshot: ResourceSnapshot, budget: int | None, load: float | None,
             ) -> dict[str, Any]:
    return {"usable_cpus": snapshot.usable_cpus, "logical_cpus": snapshot.logical_cpus,
            "mem_available": snapshot.effective_mem_available, "mem_limit": budget,
            "load_average_before": load, "python": sys.version.split()[0],
            "platform": sys.platform}


def _noise_note(runs: Sequence[SweepRun], plan: _SweepPlan) -> tuple[str, ...]:
    """Rounds of one configuration that differ a lot: something else was using the machine."""
    notes = []
    again = [r for r in runs if len(r.rounds) > plan.repeat]
    if again:
        notes.append(f"{len(again)} configurations ran an extra round because other processes "
                     "took the CPUs from their workers in every round")
    worst = max(runs, key=lambda r: r.spread)
    if worst.spread >= NOISY_SPREAD:
        notes.append(f"rounds of one configuration differed by up to {worst.spread:.0%} "
                     f"({worst.workers} workers, chunk {worst.chunk_size}): the fastest round of "
                     "each counts, but on a quieter machine the recommendation would be firmer")
    return tuple(notes)


def _malloc_note(serial: SerialPass) -> tuple[str, ...]:
    """What keeping malloc's big blocks bought in the serial pass, when it was worth trying."""
    kept = serial.kept_malloc_wall
    if kept is None or kept.mean > serial.wall.mean * (1 - MALLOC_NOTE_GAIN):
        return ()
    fresh = serial.faults.mean * PAGE_BYTES
    return (f"each item touches {format_size(fresh)} of fresh memory (glibc's malloc gives big "
            f"blocks back to the system after every item); with malloc keeping them, items took "
            f"{_secs(kept.mean)} instead of {_secs(serial.wall.mean)} "
            f"({1 - kept.mean / serial.wall.mean:.0%} less). For every worker: set "
            f"MALLOC_MMAP_THRESHOLD_={KEEP_MALLOC_BYTES} MALLOC_TRIM_THRESHOLD_="
            f"{2 * KEEP_MALLOC_BYTES} in the environment before the Engine starts (workers "
            "inherit it); a big chunk (see chunk_size) triggers the same by raising glibc's "
            "threshold",)


def _cpu_ratio(serial: SerialPass) -> float | None:
    """CPU time / wall time of an item in the serial pass; None for items too short to clock."""
    if serial.wall.mean < MIN_CLOCKED_SECONDS:
        return None
    return serial.cpu.mean / serial.wall.mean


def _waiting_note(serial: SerialPass, rec: _Recommendation) -> tuple[str, ...]:
    """A stage that mostly waits (I/O, sleep, a service) may use more workers than CPUs."""
    ratio = _cpu_ratio(serial)
    if rec.limited_by != "cpu" or ratio is None or ratio >= 0.5:
        return ()
    return (f"the stage mostly waits (CPU/wall {ratio:.2f}): more workers than CPUs may pay; "
            "measure them with workers=[...] (--max-workers N)",)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def _load_note(load: float | None, snapshot: ResourceSnapshot) -> tuple[str, ...]:
    """Other work on the machine skews every measurement: say so when there was some."""
    if load is None or load < BUSY_LOAD * snapshot.usable_cpus:
        return ()
    return (f"the machine was busy before the profile started (load average {load:.1f} on "
            f"{snapshot.usable_cpus} usable CPUs): throughputs are noisy; profile on a quiet "
            "machine for a firmer recommendation",)


def _summary_lines(p: StageProfile) -> list[str]:
    s = p.serial
    blas = s.blas_threads
    lines = [
        f"stage {p.stage}: {len(s.items)} sampled items, {len(s.failed)} failed",
        f"serial: wall {_secs(s.wall.mean)}/item (median {_secs(s.wall.median)}, p99 "
        f"{_secs(s.wall.p99)}, max {_secs(s.wall.max)}, sd {_secs(s.wall.stdev)}; first call "
        f"{_secs(s.warmup.wall)}), CPU {_cpu_text(s)}",
        f"        peak RSS growth {format_size(s.rss_growth.mean)}/item (max "
        f"{format_size(s.rss_growth.max)}), worker {format_size(s.worker_baseline_rss)} RSS fresh "
        f"-> {format_size(s.worker_peak_rss)} peak; payload {format_size(s.bytes_in.mean)} in, "
        f"{format_size(s.bytes_out.mean)} out (pickled); round trip overhead {_secs(s.overhead)}",
        f"        {s.faults.mean:.0f} page faults/item ({format_size(s.faults.mean * PAGE_BYTES)} of "
        f"fresh memory); BLAS threads: {blas.get('threads')} ({blas.get('source')})",
        "",
        f"{'workers':>7} {'chunk':>6} {'items':>8} {'wall s':>7} {'items/s':>9} {'adjusted':>9} "
        f"{'speedup':>7} {'effic.':>6} {'IPC':>5} {'CPU %':>6} {'RSS MiB':>8} {'spread':>6}",
    ]
    rows = [*p.runs, *([p.confirmation] if p.confirmation else [])]
    for r in rows:
        cpu = "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}"
        rss = "-" if r.peak_rss is None else f"{r.peak_rss / 2**20:.0f}"
        mark = "  <- recommended" if r is p.confirmation else ""
        lines.append(f"{r.workers:>7} {r.chunk_size:>6} {r.items:>8} {r.wall:>7.2f} "
                     f"{r.throughput:>9.4g} {r.adjusted:>9.4g} {r.speedup:>7.2f} {r.efficiency:>6.2f} "
                     f"{r.ipc_share:>5.0%} {cpu:>6} {rss:>8} {r.spread:>6.0%}{mark}")
    lines.append("(each row: the best of its rounds; adjusted: items/s over the share of CPU the "
                 "workers got, for a CPU-bound stage; spread: how much slower the slowest round was)")
    lines += ["", f"recommended: Engine({_kwargs_text(p.recommended)})  [limited by "
                  f"{p.limited_by}; {p.expected_throughput:.4g} items/s]"]
    lines += [f"  {key}: {text}" for key, text in p.reasons.items()]
    lines.append(f"sampler: {len(p.samples)} samples every {SAMPLE_INTERVAL:g} s, "
                 f"{p.sampler_cpu_share:.2%} of one CPU")
    lines += [f"note: {note}" for note in p.notes]
    return lines


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: map them to None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, optional and lazy: Figure objects, no pyplot state, no GUI backend)
# --------------------------------------------------------------------------------------------------


def _plot(p: StageProfile, directory: Path) -> tuple[list[Path], str | None]:
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
