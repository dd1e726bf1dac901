"""Keyword-only, validated settings and the parsing of size strings ("512MiB", "2GB").

Everything here is pure: values come in, validated values (or a ``ValueError`` / ``TypeError`` naming
the argument) come out. Nothing reads the machine.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["DEFAULT", "DEFAULT_RETRY_ON", "Default", "EngineConfig", "format_size", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# No machine has this much memory; a budget above it is a unit mistake, and twice it must still
# fit the signed 64-bit rlimit a worker's memory cap is written to.
MAX_BYTES = 2**60
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, *, name: str = "size") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative int, or a string such as ``"512MiB"``, ``"2GB"``, ``"1.5 GiB"``, ``"4096"``.
    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024.

    Raises ``TypeError`` for other types and ``ValueError`` (naming ``name``) for malformed,
    negative or non-finite sizes.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a size string like '512MiB', not bool")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of bytes, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a number of bytes or a size string like '512MiB', "
            f"not {type(value).__name__}"
        )
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{name}: cannot parse size {value!r}; use bytes or a unit such as "
            "'512MiB', '2GB', '1.5GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Format a byte count for humans, in binary units: ``format_size(3.1 * 2**30) == '3.1 GiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# ---- engine settings ------------------------------------------------------------------------

Timeout = float | Callable[[Any], float] | None
# A per-call option left at this value means "use the engine's setting" (None is a real value).
class Default(enum.Enum):
    """The type of :data:`DEFAULT`: a per-call option left out means the engine's setting."""

    TOKEN = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = Default.TOKEN
FAILURE_KINDS = frozenset({"error", "crash", "timeout", "serialization", "cancelled"})
# What ``retries`` re-runs unless ``retry_on`` says otherwise: failures that are usually
# transient (a worker killed by the OOM killer, a stall). An item that raised most likely raises
# again (a corrupt file decoded twice is twice the noise), so errors are opt-in.
DEFAULT_RETRY_ON: tuple[str, ...] = ("crash", "timeout")


def check_int(value: object, name: str, *, minimum: int, also: str = "") -> int:
    """``value`` as an int >= ``minimum``; ``TypeError`` for anything else (a bool or a float
    included), ``ValueError`` below the minimum, both naming ``name``. ``also`` names the other
    accepted values in the message (" or None")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}{also}, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (or None when allowed); otherwise an error naming ``name``."""
    if value is None and allow_none:
        return None
    return check_int(value, name, minimum=1, also=" or None" if allow_none else "")


def check_workers(value: object) -> int | None:
    """``workers``: an int >= 1, or "auto" (None)."""
    if value == "auto":
        return None
    if isinstance(value, str):  # "Auto", "4": a typo, not a count
        raise TypeError(f"workers must be an int >= 1 or 'auto', not {value!r}")
    return check_int(value, "workers", minimum=1, also=" or 'auto'")


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool; otherwise a ``TypeError`` naming ``name`` (a string such as
    ``"no"`` is truthy, so accepting it would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), not {value!r}")
    return value


def check_seconds(value: object, name: str, *, zero_ok: bool = False) -> float:
    """``value`` as a finite float of seconds, > 0 (>= 0 with ``zero_ok``).

    Raises ``TypeError`` for a non-number (bool included) and ``ValueError`` for NaN, infinity or
    a number out of range, each naming ``name``: a NaN deadline never comes and an infinite one
    never fires, so either would hang a batch instead of failing it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>=' if zero_ok else '>'} 0 seconds, got {value!r}")
    return seconds


def check_timeout(value: object, name: str = "timeout") -> Timeout:
    """A positive, finite number of seconds (however large), a callable of the item returning
    one, or None (no limit)."""
    if value is None or callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
        raise TypeError(f"{name} must be seconds (a number), a callable of the item, or None; "
                        f"not {value!r}")
    if value == math.inf:
        raise ValueError(f"{name} must be a finite number of seconds, got inf; "
                         f"use None for no timeout")
    return check_seconds(value, name)


def check_backoff(backoff: object, retries: int) -> float:
    """``backoff`` as finite seconds >= 0 whose longest wait, before the last retry
    (``backoff * 2**(retries - 1)``), can still be waited for (``threading.TIMEOUT_MAX``)."""
    seconds = check_seconds(backoff, "backoff", zero_ok=True)
    # Compared in logarithms: the product itself overflows a float for a few thousand retries.
    if seconds and retries and math.log2(seconds) + retries - 1 > math.log2(threading.TIMEOUT_MAX):
        raise ValueError(
            f"backoff={backoff!r} with retries={retries} would wait backoff * 2**{retries - 1} "
            f"seconds before the last retry, more than can be waited for "
            f"({threading.TIMEOUT_MAX:.3g} s); lower retries or backoff"
        )
    return seconds


def check_initargs(value: object) -> tuple[Any, ...]:
    """The initializer's arguments as a tuple; only a tuple or a list is taken, since anything
    else iterable (a string, a dict) would be spread into arguments nobody meant."""
    if not isinstance(value, tuple | list):
        raise TypeError(f"initargs must be a tuple or list of the initializer's arguments, not "
                        f"{type(value).__name__}; for a single argument x write initargs=(x,)")
    return tuple(value)


def check_shared(value: object) -> dict[str, Any]:
    """``shared``: None or a mapping of names (non-empty strings) to values, copied (a later
    change to the caller's dict does not reach the workers)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"shared must be a dict of names to values, such as "
                        f"shared={{'filterbank': fb}}, not {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise TypeError(f"shared: every name must be a non-empty str (read back with "
                            f"stagepool.shared(name)), not {name!r}")
    return dict(value)


def check_retry_on(value: object) -> tuple[str | type[BaseException], ...]:
    """Failure kinds ("crash", "timeout", ...) and/or exception types that deserve a retry."""
    entries = value if isinstance(value, tuple | list | set | frozenset) else (value,)
    out: list[str | type[BaseException]] = []
    for entry in entries:
        is_kind = isinstance(entry, str) and entry in FAILURE_KINDS
        if is_kind or (isinstance(entry, type) and issubclass(entry, BaseException)):
            out.append(entry)
        else:
            raise ValueError(f"retry_on entries must be exception types or one of "
                             f"{sorted(FAILURE_KINDS)}, got {entry!r}")
    return tuple(out)


# How long a worker's initializer may run before the engine gives up on it (kills the worker and
# fails the items with InitializerError). Generous: initializers load models and build tables;
# but finite, so a hung initializer cannot block every call forever.
DEFAULT_INIT_TIMEOUT = 600.0


def _check_init_timeout(value: object) -> float | None:
    return None if value is None else check_seconds(value, "init_timeout")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Validated engine settings; build with :meth:`create`, which raises naming the argument."""

    workers: int | None  # None = "auto"
    mem_per_task: int | None
    chunk_size: int | None  # None = "auto"
    max_in_flight: int | None
    progress: bool
    timeout: Timeout
    retries: int
    retry_on: tuple[str | type[BaseException], ...]
    backoff: float
    max_rss_per_worker: int | None
    max_tasks_per_worker: int | None
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    shm_threshold: int  # arrays this big or bigger travel through shared memory; 0 = never
    writable_inputs: bool  # workers get private copy-on-write arrays instead of read-only views
    rerun_innocent: bool = True  # re-run items whose results were lost with a dead worker
    init_timeout: float | None = DEFAULT_INIT_TIMEOUT  # seconds the initializer may take
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # see stagepool.shared
    reserve_cores: int = 0  # CPUs "auto" leaves to the calling process
    preload: tuple[str, ...] = ()  # modules imported once into the workers' template

    @classmethod
    def create(cls, **kw: Any) -> EngineConfig:
        mem, rss = kw["mem_per_task"], kw["max_rss_per_worker"]
        retries = check_int(kw["retries"], "retries", minimum=0)
        initializer = kw["initializer"]
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        return cls(
            workers=check_workers(kw["workers"]),
            mem_per_task=None if mem is None else positive_size(mem, "mem_per_task"),
            chunk_size=validate_chunk_size(kw["chunk_size"]),
            max_in_flight=check_positive_int(kw["max_in_flight"], "max_in_flight", allow_none=True),
            progress=check_bool(kw["progress"], "progress"),
            timeout=check_timeout(kw["timeout"]),
            retries=retries,
            retry_on=check_retry_on(kw["retry_on"]),
            backoff=check_backoff(kw["backoff"], retries),
            max_rss_per_worker=None if rss is None else positive_size(rss, "max_rss_per_worker"),
            max_tasks_per_worker=check_positive_int(kw["max_tasks_per_worker"],
                                                    "max_tasks_per_worker", allow_none=True),
            initializer=initializer,
            initargs=check_initargs(kw["initargs"]),
            shm_threshold=parse_size(kw["shm_threshold"], name="shm_threshold"),
            writable_inputs=check_bool(kw["writable_inputs"], "writable_inputs"),
            rerun_innocent=check_bool(kw.get("rerun_innocent", True), "rerun_innocent"),
            init_timeout=_check_init_timeout(kw.get("init_timeout", DEFAULT_INIT_TIMEOUT)),
            shared=check_shared(kw.get("shared")),
            reserve_cores=check_int(kw.get("reserve_cores", 0), "reserve_cores", minimum=0),
            preload=check_preload(kw.get("preload", ())),
        )


def check_preload(value: object) -> tuple[str, ...]:
    """Module names such as ``("numpy", "scipy.signal")``: a bare string would be a tuple of
    letters, so it is refused; whether they import is the template's to find out (importing
    them here would cost the caller what preloading saves the workers)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"preload must be a tuple of module names such as ('numpy', "
                        f"'scipy.signal'), not {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload: {name!r} is not a module name such as 'scipy.signal'")
    return tuple(value)


def positive_size(value: int | float | str, name: str) -> int:
    """:func:`parse_size` of a memory budget: a ``ValueError`` naming ``name`` for 0 bytes (or a
    size that rounds down to 0) and for more than ``MAX_BYTES``."""
    size = parse_size(value, name=name)
    if size <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    if size > MAX_BYTES:
        raise ValueError(f"{name} must be at most 1 EiB (more memory than any machine has), "
                         f"got {value!r}")
    return size


# A numeric timeout's limits, one shared tuple per chunk size (at most UNIFORM_KEEP sizes
# kept): building a chunk's (~10-50 us for 10,000 items) and finding it uniform again in the
# pool thread (``is_uniform``; a scan was ~25-90 us) cost a tiny map 2-9%.
_uniform: dict[tuple[type, float, int], tuple[float, ...]] = {}
UNIFORM_KEEP = 8


def item_timeouts(timeout: Timeout, items: list[Any],
                  start: int) -> tuple[float, ...] | Exception | None:
    """Each item's limit in seconds (inf: none), or the error a callable ``timeout`` gave."""
    if timeout is None:
        return None
    if not callable(timeout):
        key = (type(timeout), timeout, len(items))  # 60 and 60.0 stay what they were
        limits = _uniform.get(key)
        if limits is None:
            if len(_uniform) >= UNIFORM_KEEP:
                _uniform.clear()
            limits = _uniform[key] = (timeout,) * len(items)
        return limits
    out = []
    for i, item in enumerate(items):
        try:
            given = timeout(item)
        except Exception as exc:  # say whose error it is: the item's function never ran
            error = ValueError(f"timeout(item {start + i}) raised {type(exc).__name__}: {exc}; "
                               "the item did not run")
            error.__cause__ = exc
            return error
        if callable(given):
            return TypeError(f"timeout(item {start + i}) must return seconds or None, "
                             f"not a callable ({given!r})")
        try:
            value = check_timeout(given, f"timeout(item {start + i})")
        except Exception as exc:
            return exc
        out.append(float("inf") if value is None else float(value))  # type: ignore[arg-type]
    return tuple(out)


def is_uniform(limits: tuple[float, ...]) -> bool:
    """Whether ``limits`` came from a numeric timeout (``item_timeouts``): all alike."""
    return bool(limits) and _uniform.get((type(limits[0]), limits[0], len(limits))) is limits


def validate_chunk_size(value: object, *, name: str = "chunk_size") -> int | None:
    """Return an int for a fixed size, None for "auto"; raise naming ``name`` otherwise."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1 or 'auto', not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 or 'auto', got {value}")
    return value
