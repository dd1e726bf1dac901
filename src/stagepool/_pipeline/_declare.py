"""Declaring a pipeline: named stages, their inputs and options, validated at declaration, and
the pure cut of the DAG into fused groups (``plan_groups``).

A stage is declared after the stages it reads (``after=``), so the declaration order is a
topological order and a cycle cannot be written: naming a stage not declared yet is an error
that says so.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

from .._config import (
    check_backoff,
    check_bool,
    check_int,
    check_positive_int,
    check_retry_on,
    check_timeout,
    positive_size,
    validate_chunk_size,
)

__all__ = ["INPUT", "Group", "Pipeline", "StageSpec", "plan_groups"]

INPUT = ""  # the name root stages read: the segment itself
_uids = itertools.count()


@dataclasses.dataclass(frozen=True, slots=True)
class StageSpec:
    """One declared stage (validated); ``after`` are the stage names it reads, in order."""

    name: str
    fn: Callable[..., Any]
    after: tuple[str, ...]
    timeout: float | None = None
    retries: int = 0
    retry_on: tuple[str | type[BaseException], ...] = ("error",)
    backoff: float = 0.0
    max_concurrent: int | None = None
    chunk_size: int | None = None
    mem_per_task: int | None = None
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], object] | None = None
    fuse: bool = True

    @property
    def fusable(self) -> bool:
        """Whether the stage may share a task with others: options that cap or size its own
        tasks (``max_concurrent``, ``chunk_size``, ``mem_per_task``) need a batch of its own."""
        return self.fuse and self.max_concurrent is None and self.chunk_size is None \
            and self.mem_per_task is None


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """Stages that run together, for one segment, as one task item (indices into the stages)."""

    stages: tuple[int, ...]
    fused: bool  # False: one stage with options that need its own batch


class Pipeline:
    """A small DAG of named stages that every segment flows through.

        p = sp.Pipeline()
        p.stage("decode", decode)
        p.stage("resample", resample, after="decode")
        p.stage("features", features, after="resample")
        p.stage("loudness", loudness, after="resample")
        p.stage("encode", encode, after=("features", "loudness"))

    A stage without ``after`` reads the segment; with several, it gets their outputs as
    positional arguments in that order. The stages nothing reads are the leaves: a segment's
    value is the leaf's output (several leaves: a dict by name). Run it with
    ``engine.run(p, segments)`` (or ``run_iter``, ``run_async``, ``run_iter_async``).

    Every mistake is refused here, naming the stage: a duplicate or empty name, ``after`` naming
    a stage not declared before, a function that is not a plain callable, a bad option.
    """

    def __init__(self) -> None:
        self._stages: list[StageSpec] = []
        self._names: dict[str, int] = {}
        # The identity of this pipeline's stages in workers (setup results are cached by it).
        self.uid = f"{os.getpid()}-{next(_uids)}"

    def stage(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        after: str | Sequence[str] = (),
        timeout: float | None = None,
        retries: int = 0,
        retry_on: Any = ("error",),
        backoff: float = 0.0,
        max_concurrent: int | None = None,
        chunk_size: int | str | None = None,
        mem_per_task: int | str | None = None,
        setup: Callable[[], Any] | None = None,
        teardown: Callable[[Any], object] | None = None,
        fuse: bool = True,
    ) -> Pipeline:
        """Declare a stage; returns the pipeline (so declarations chain).

        * ``timeout``: seconds one run of the stage may take. A stage that finishes late fails
          with kind ``"timeout"`` (its value is dropped); a stage that hangs is killed when its
          group's limit (the sum of its fused stages' timeouts) runs out, and the outcome names
          it. ``fuse=False`` gives a stage an exact limit of its own.
        * ``retries`` / ``retry_on`` / ``backoff``: re-run the stage, in the same worker, when it
          raises an exception of a type in ``retry_on`` (or anything, with ``"error"``); kinds
          ``"crash"`` and ``"timeout"`` in ``retry_on`` re-run the stage's whole group.
        * ``max_concurrent``, ``chunk_size``, ``mem_per_task`` (segments of this stage in the
          workers at once; items per task; memory one run needs, which caps how many run at
          once), ``fuse=False``: the stage runs as a batch of its own, at the same time as the
          others, fed through a bounded buffer (its inputs travel through the backend's codec:
          shared memory locally).
        * ``setup()`` runs once in each worker that runs the stage, before its first run there;
          its value is passed to the stage as the keyword argument ``ctx``. If it raises, every
          run of the stage in that worker fails with :class:`InitializerError` naming the stage
          (the setup is not tried again in that worker). ``teardown(ctx)`` runs when the worker
          exits normally (best effort: not after a crash, a kill or a timeout).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"stage name must be a non-empty str, not {name!r}")
        if name in self._names:
            raise ValueError(f"stage {name!r} is declared twice; stage names must be unique")
        spec = StageSpec(name, _check_fn(name, fn), self._check_after(name, after),
                         **_options(name, timeout=timeout, retries=retries, retry_on=retry_on,
                                    backoff=backoff, max_concurrent=max_concurrent,
                                    chunk_size=chunk_size, mem_per_task=mem_per_task,
                                    setup=setup, teardown=teardown, fuse=fuse))
        self._names[name] = len(self._stages)
        self._stages.append(spec)
        return self

    def _check_after(self, name: str, after: str | Sequence[str]) -> tuple[str, ...]:
        names = (after,) if isinstance(after, str) else after
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"stage {name!r}: after must be a stage name or a sequence of "
                            f"names, not {after!r}")
        for dep in names:
            if dep == name:
                raise ValueError(f"stage {name!r} cannot come after itself")
            if dep not in self._names:
                known = ", ".join(map(repr, self._names)) or "none yet"
                raise ValueError(f"stage {name!r}: after={dep!r} names no stage declared "
                                 f"before it (declared: {known}); declare stages in the order "
                                 "they run")
        if len(set(names)) != len(names):
            raise ValueError(f"stage {name!r}: after names a stage twice: {list(names)}")
        return tuple(names)

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """The declared stages, in declaration (topological) order."""
        return tuple(self._stages)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The stages no other stage reads: their outputs are a segment's value."""
        read = {dep for s in self._stages for dep in s.after}
        return tuple(s.name for s in self._stages if s.name not in read)

    def __repr__(self) -> str:
        edges = ", ".join(f"{s.name}<-{'+'.join(s.after) or 'input'}" for s in self._stages)
        return f"<stagepool.Pipeline {len(self._stages)} stages: {edges}>"


def _check_fn(name: str, fn: object) -> Callable[..., Any]:
    if not callable(fn):
        raise TypeError(f"stage {name!r}: fn must be callable, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"stage {name!r}: fn must be a plain function, not a coroutine "
                        "function (nothing would await it)")
    return fn


def _options(name: str, **given: Any) -> dict[str, Any]:
    """The stage's options, validated; errors name the stage and the option."""
    try:
        retries = check_int(given["retries"], "retries", minimum=0)
        out = dict(
            timeout=_check_stage_timeout(given["timeout"]),
            retries=retries,
            retry_on=check_retry_on(given["retry_on"]),
            backoff=check_backoff(given["backoff"], retries),
            max_concurrent=check_positive_int(given["max_concurrent"], "max_concurrent",
                                              allow_none=True),
            chunk_size=None if given["chunk_size"] is None
            else validate_chunk_size(given["chunk_size"]),
            mem_per_task=None if given["mem_per_task"] is None
            else positive_size(given["mem_per_task"], "mem_per_task"),
            setup=_optional_callable(given["setup"], "setup"),
            teardown=_optional_callable(given["teardown"], "teardown"),
            fuse=check_bool(given["fuse"], "fuse"),
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"stage {name!r}: {exc}") from None
    if given["chunk_size"] == "auto":  # "auto" is the engine's way: no batch of its own needed
        out["chunk_size"] = None
    return out


def _check_stage_timeout(value: object) -> float | None:
    checked = check_timeout(value)
    if callable(checked):
        raise TypeError("timeout must be seconds or None (a stage's limit is per run, not a "
                        "function of the item)")
    return None if checked is None else float(checked)


def _optional_callable(value: object, what: str) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{what} must be callable or None, not {type(value).__name__}")
    return value


def plan_groups(stages: Sequence[StageSpec]) -> list[Group]:
    """Cut the stages (in topological order) into groups that run one after another.

    Fusable stages share a group, and so one task per segment: their intermediates never leave
    the worker. A fusable stage joins the first fused group at or after the groups of its inputs
    (so an independent branch declared after a stage with its own batch still fuses with the
    stages before it). A stage that needs its own batch is a group alone. Timed and untimed
    stages are not fused, so that a group's hard limit (the sum of its stages' timeouts) is
    never "none" for a stage that has one. Every stage's inputs are in its own or an earlier
    group, and each group lists its stages in topological order.
    """
    groups: list[list[int]] = []
    where: dict[str, int] = {}
    for i, spec in enumerate(stages):
        first = max((where[dep] for dep in spec.after), default=0)
        home = next((g for g in range(first, len(groups)) if spec.fusable
                     and stages[groups[g][0]].fusable
                     and (stages[groups[g][0]].timeout is None) == (spec.timeout is None)), None)
        if home is None:
            home = len(groups)
            groups.append([])
        groups[home].append(i)
        where[spec.name] = home
    return [Group(tuple(g), stages[g[0]].fusable) for g in groups]


for _public in (Pipeline,):
    _public.__module__ = "stagepool"
