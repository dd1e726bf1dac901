"""The ``stagepool`` command: ``demo`` (the built-in media workload), ``plan`` (the worker plan),
``profile`` (measure a stage and recommend its Engine settings)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagepool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the built-in media workload (synthetic soundtrack)")
    demo.add_argument("--seconds", type=float, default=600.0,
                      help="length of the synthetic soundtrack (default 600 = 10 minutes)")
    demo.add_argument("--segments", type=int, default=None,
                      help="number of 2-second segments (overrides --seconds)")
    demo.add_argument("--segment-seconds", type=float, default=2.0)
    demo.add_argument("--workers", default="auto", help="worker count or 'auto' (default)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--pipeline", action="store_true",
                      help="run the stages as a pipeline (a DAG with one independent branch)")
    _add_backend_arguments(demo)

    plan = sub.add_parser("plan", help="show the machine's resources and the worker plan")
    plan.add_argument("--mem-per-task", default=None, help="memory one task needs, e.g. 1GiB")
    plan.add_argument("--reserve-cores", type=int, default=0)
    plan.add_argument("--max-workers", type=int, default=None)
    _add_profile_parser(sub)
    return parser


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--address``: where the command's engines run (see ``_where``)."""
    parser.add_argument("--backend", choices=("local", "dask"), default="local",
                        help="local worker processes (default), or a dask cluster")
    parser.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                        help="the dask scheduler to use (default: a LocalCluster on this machine)")


def _where(args: argparse.Namespace) -> tuple[str, str | None]:
    """(backend, address) from ``_add_backend_arguments``'s flags; an address without
    ``--backend dask`` is refused naming the fix."""
    if args.address is not None and args.backend != "dask":
        raise SystemExit("stagepool: --address is the dask scheduler to use: add --backend dask")
    return args.backend, args.address


def _add_profile_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = sub.add_parser(
        "profile", help="measure a stage and recommend workers, chunk size, memory and timeout",
        description="Run a stage serially on sample items, then through the engine across worker "
                    "counts and chunk sizes; print a table and the recommended Engine settings.")
    profile.add_argument("target", nargs="?", metavar="MODULE:FUNCTION",
                         help="the stage: a picklable function of one item")
    profile.add_argument("--items", metavar="MODULE:FACTORY",
                         help="a callable returning an iterable of sample items")
    profile.add_argument("--demo", action="store_true",
                         help="profile the built-in demo stage (stagepool.demo:process_segment)")
    profile.add_argument("--sample", type=int, default=16, metavar="N",
                         help="sample items taken from the factory (default 16)")
    profile.add_argument("--out", default=None, metavar="DIR",
                         help="write profile.json, measurements.json and PNG plots here")
    profile.add_argument("--mem-limit", default=None, metavar="SIZE",
                         help="memory the workers may use together, e.g. 4GiB (default: available)")
    profile.add_argument("--max-workers", type=int, default=None, metavar="N",
                         help="try 1 .. N workers (default: the usable CPUs)")
    profile.add_argument("--chunk-sizes", type=_sizes, default=None, metavar="C,C,...",
                         help="chunk sizes to try (default: 1 .. ~0.5 s of work per chunk)")
    profile.add_argument("--run-seconds", type=float, default=1.0, metavar="S",
                         help="length of each measured run (default 1)")
    profile.add_argument("--repeat", type=int, default=3, metavar="R",
                         help="rounds over every configuration; the fastest counts (default 3)")
    profile.add_argument("--budget", type=_budget, default=15.0, metavar="S",
                         help="seconds the whole profile should take (default 15; 0: no limit)")
    profile.add_argument("--cost", default=None, metavar="MODULE:FUNCTION",
                         help="an item's cost (samples, bytes): also recommend a timeout that "
                              "scales with it (Engine.from_profile(DIR, cost=...))")
    profile.add_argument("--no-progress", action="store_true", help="print only the result")
    _add_backend_arguments(profile)


def _sizes(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,4,16, got {value!r}") from None


def _budget(value: str) -> float | None:
    """--budget: seconds, 0 for no limit."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds such as 15, got {value!r}") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds or None


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"stagepool: --workers must be an integer or 'auto', not {value!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    seconds = args.seconds if args.segments is None else args.segments * args.segment_seconds
    backend, address = _where(args)
    return run_demo(seconds=seconds, segment_seconds=args.segment_seconds,
                    workers=_workers(args.workers), progress=not args.no_progress,
                    backend=backend, address=address, pipeline=args.pipeline)


def _plan(args: argparse.Namespace) -> int:
    from ._planning import format_snapshot, plan_workers
    from ._resources import ResourceSnapshot

    snapshot = ResourceSnapshot.read()
    plan = plan_workers(mem_per_task=args.mem_per_task, reserve_cores=args.reserve_cores,
                        max_workers=args.max_workers, snapshot=snapshot)
    print(format_snapshot(snapshot))
    print()
    print(f"plan: {plan.reason}")
    env = plan.thread_env()
    if env:
        print("worker thread budget: " + ", ".join(f"{k}={v}" for k, v in sorted(env.items())))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import functools
    import os
    from collections.abc import Callable
    from typing import Any

    from . import demo
    from ._profiling import profile_stage, resolve_target, sample_from_factory

    if args.demo:
        if args.target or args.items:
            raise ValueError("--demo profiles the built-in stage: give no MODULE:FUNCTION or --items")
        fn, name = demo.process_segment, "stagepool.demo:soundtrack"
        factory: Callable[[], Any] = functools.partial(demo.soundtrack, seconds=2.0 * args.sample, corrupt=())
    else:
        if not args.target or not args.items:
            raise ValueError("give the stage and its sample items: MODULE:FUNCTION --items "
                             "MODULE:FACTORY (or --demo)")
        if os.getcwd() not in sys.path:  # like `python -m`: the user's modules sit here
            sys.path.insert(0, os.getcwd())
        fn = resolve_target(args.target, what="stage")
        name = args.items
        factory = resolve_target(args.items, what="items factory")
    backend, address = _where(args)
    if args.out is not None:
        _check_out(args.out)
    items = sample_from_factory(factory, args.sample, name=f"items factory {name!r}")
    cost = None if args.cost is None else resolve_target(args.cost, what="cost function")
    try:
        profile = profile_stage(fn, items, workers=args.max_workers, mem_limit=args.mem_limit,
                                chunk_sizes=args.chunk_sizes,
                                progress=not args.no_progress, run_seconds=args.run_seconds,
                                repeat=args.repeat, budget=args.budget, cost=cost,
                                backend=backend, address=address)
    except KeyboardInterrupt:
        print("stagepool profile: interrupted; nothing was written", file=sys.stderr)
        return 130
    if args.out is not None:
        try:
            profile = profile.write(args.out)
        except OSError as exc:
            print(f"stagepool profile: cannot write the results to {args.out}: {exc}",
                  file=sys.stderr)
            print(profile.summary())
            return 1
    print(profile.summary())
    if args.out is None:
        print("(add --out DIR to save profile.json for Engine.from_profile, measurements.json "
              "and plots)")
    else:
        print("wrote " + ", ".join(str(path) for path in profile.files))
    return 0


def _check_out(out: str) -> None:
    """``--out`` before the profile spends its budget: a place that cannot take the results
    fails now (``ValueError``), not after the run. The directory itself is made at the end."""
    import os
    from pathlib import Path

    path = Path(out).absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {there} is not a directory this process can write in")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "profile":
            return _profile(args)
        return _plan(args)
    except (ValueError, TypeError) as exc:
        print(f"stagepool {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
