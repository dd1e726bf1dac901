"""The ``stagepool`` command: ``demo`` (the built-in media workload), ``plan`` (the worker plan)."""

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

    plan = sub.add_parser("plan", help="show the machine's resources and the worker plan")
    plan.add_argument("--mem-per-task", default=None, help="memory one task needs, e.g. 1GiB")
    plan.add_argument("--reserve-cores", type=int, default=0)
    plan.add_argument("--max-workers", type=int, default=None)
    return parser


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
    return run_demo(seconds=seconds, segment_seconds=args.segment_seconds,
                    workers=_workers(args.workers), progress=not args.no_progress)


def _plan(args: argparse.Namespace) -> int:
    from ._resources import ResourceSnapshot, format_snapshot, plan_workers

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        return _plan(args)
    except (ValueError, TypeError) as exc:
        print(f"stagepool {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
