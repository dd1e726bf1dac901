"""Method: every (workload, peer) pair runs in a fresh ``spawn`` subprocess, with a deadline on each
phase, so a peer that hangs or dies costs its own row and never the harness.

    parent (this module, run_isolated)                 child (_child_main), fresh interpreter
    ----------------------------------                 ------------------------------------------
    spawn child(job) ---------------------------------> workload.prepare(params)
                                                        peer.start()  + a trivial probe batch
    poll(start_timeout) <------ ("started", s, info) --/
                                                        warm-up run(s), then ``repeat`` timed runs
    poll(run_timeout)   <------ ("run", warm, result) -- one message per run
    poll(run_timeout)   <------ ("final", numbers) ---- workload.final(): once, if it has one
                                                        peer.close(); list processes left behind
    poll(run_timeout)   <------ ("done", s, leftovers)
    join, or kill the whole process tree on any missed deadline

The parent only collects raw numbers (:class:`RawResult`); statistics are the pure functions at the
top of this module (median and min-max of the timed runs, ratio against a baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Job", "RawResult", "Summary", "kill_tree", "ratio", "run_isolated", "summarize"]


# ---- statistics (pure) -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Summary:
    """The timed runs of one row: median, fastest, slowest, how many."""

    median: float
    min: float
    max: float
    n: int


def summarize(samples: Sequence[float]) -> Summary:
    """Median and min-max of ``samples`` (seconds). Raises ``ValueError`` when there are none."""
    if not samples:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def ratio(baseline: float | None, value: float | None) -> float | None:
    """How many times faster ``value`` is than ``baseline`` (both seconds): baseline / value.

    ``None`` when either is missing or not positive, so a failed baseline shows as a blank, not
    as a made-up number.
    """
    if baseline is None or value is None or baseline <= 0 or value <= 0:
        return None
    return baseline / value


# ---- one (workload, peer) pair in a subprocess ---------------------------------------------------

@dataclasses.dataclass
class Job:
    """Everything the child needs; plain data, pickled to the spawn child."""

    workload: str
    peer: dict[str, Any]  # PeerSpec.to_json()
    params: dict[str, Any]
    workers: int
    repeat: int
    warmup: int
    run_timeout: float
    start_timeout: float


@dataclasses.dataclass
class RawResult:
    """What came back from one child: status, start-up time and each run's numbers."""

    status: str  # "ok", "n/a", "error", "timeout"
    reason: str = ""
    startup_s: float | None = None
    close_s: float | None = None
    warmup: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    final: dict[str, Any] | None = None  # workload.final's numbers (measured once per row)
    left_behind: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0


def run_isolated(job: Job) -> RawResult:
    """Run ``job`` in a fresh spawn subprocess; never raises for anything the peer does."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    # Not a daemon: daemonic processes may not start the pool's own worker processes.
    proc = ctx.Process(target=_child_main, args=(sender, job), name=f"bench-{job.workload}")
    began = time.perf_counter()
    proc.start()
    sender.close()
    result = RawResult(status="error")
    try:
        _collect(receiver, proc, job, result)
    finally:
        receiver.close()
        _reap(proc, result)
        result.elapsed_s = time.perf_counter() - began
    return result


def _collect(receiver: Connection, proc: Any, job: Job, result: RawResult) -> None:
    deadline, phase = job.start_timeout, "start-up"
    while True:
        message = _receive(receiver, deadline)
        if message is None:
            result.status = "timeout"
            result.reason = f"no answer within {deadline:g} s during {phase}; process tree killed"
            kill_tree(proc.pid)
            return
        if message == "eof":
            proc.join(5)
            result.status = "error"
            result.reason = f"the benchmark subprocess died during {phase} (exit code {proc.exitcode})"
            return
        kind = message[0]
        if kind == "started":
            result.startup_s, result.info = message[1], message[2]
            deadline = job.run_timeout
            phase = "warm-up run 1"
        elif kind == "run":
            _, warm, run = message
            (result.warmup if warm else result.runs).append(run)
            done = len(result.warmup) + len(result.runs)
            phase = (f"timed run {len(result.runs) + 1}" if done >= job.warmup
                     else f"warm-up run {done + 1}")
            if done == job.warmup + job.repeat:
                phase = "the final measurement or shutdown"
        elif kind == "final":
            result.final = message[1]
            phase = "shutdown"
        elif kind == "done":
            result.status, result.close_s, result.left_behind = "ok", message[1], message[2]
            return
        else:  # "n/a" or "error"
            result.status, result.reason = kind, message[1]
            return


def _receive(receiver: Connection, timeout: float) -> Any:
    if not receiver.poll(timeout):
        return None
    try:
        return receiver.recv()
    except (EOFError, OSError):
        return "eof"


def _reap(proc: Any, result: RawResult) -> None:
    proc.join(30)
    if proc.is_alive():
        kill_tree(proc.pid)
        proc.join(5)
        if result.status == "ok":
            result.reason = "the subprocess hung on exit after its runs; killed"
    for left in result.left_behind:  # processes the peer left running after close(): ours to end
        kill_tree(left["pid"], created=left["created"])


def kill_tree(pid: int, *, created: float | None = None) -> None:
    """SIGKILL ``pid`` and every descendant (collected first, so none is orphaned unseen).

    ``created``: the process's start time as psutil saw it; a recycled pid is left alone.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        if created is not None and root.create_time() != created:
            return
        family = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=5)


# ---- the child ---------------------------------------------------------------------------------

def _child_main(conn: Connection, job: Job) -> None:
    """Runs in the spawn subprocess: prepare, start the peer, warm up, time, close, report."""
    from . import suite
    from .peers import NotExpressible, PeerSpec, make_peer

    peer = workload = None
    state: Any = None
    try:
        workload = suite.get(job.workload)
        spec = PeerSpec.from_json(job.peer)
        state = workload.prepare(job.params, spec)
        peer = make_peer(spec, job.workers)
        began = time.perf_counter()
        peer.start()
        conn.send(("started", time.perf_counter() - began, peer.describe()))
        for i in range(job.warmup + job.repeat):
            run = workload.run(peer, state)
            run.update(peer.run_extra())
            conn.send(("run", i < job.warmup, run))
        final = workload.final(peer, state)
        if final is not None:
            conn.send(("final", final))
        releasing, workload = workload, None
        releasing.release(state)
        began = time.perf_counter()
        closing, peer = peer, None
        closing.close()
        conn.send(("done", time.perf_counter() - began, _descendants()))
    except NotExpressible as exc:
        conn.send(("n/a", str(exc)))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:  # clean up after an error already reported: a second one would hide it
        if peer is not None:
            with contextlib.suppress(BaseException):
                peer.close()
        if workload is not None and state is not None:  # prepare ran; the runs did not end
            with contextlib.suppress(BaseException):
                workload.release(state)
        conn.close()


def _descendants() -> list[dict[str, Any]]:
    """Processes still running under this child after the peer closed (workers it left behind).

    Resource trackers are not counted: they are per-interpreter helpers that exit with it.
    """
    import psutil

    time.sleep(0.2)  # give exiting workers a moment, so only real stragglers are reported
    left = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(p.cmdline())
            if "resource_tracker" in cmdline:
                continue
            left.append({"pid": p.pid, "created": p.create_time(), "cmdline": cmdline[:200]})
        except psutil.Error:
            continue
    return left
