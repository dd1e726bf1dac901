"""The dask backend's calls that reach the cluster: connecting (or starting an in-process
``LocalCluster``), waiting for a first worker, submitting one chunk, asking a worker for its lanes,
and removing an engine's plugin. Each is bounded by a timeout below."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dask
import distributed
from distributed.comm.addressing import get_address_host_port, parse_address
from distributed.comm.registry import get_backend

from .._protocol import Task
from ._memory import MEMORY
from ._plugin import RETIRED, ended_topic, lane_pids, run_chunk

__all__ = ["KILL_RECORD_WAIT", "RPC_TIMEOUT", "chunks_ended", "close_own_cluster", "connect",
           "direct", "ended_within", "left_gracefully",
           "retired_chunks", "submit_chunk", "unregister", "wait_for_first_worker",
           "worker_lane_pids", "workers_info"]

# Payloads above this go to their worker with ``client.scatter`` (directly, one hop) instead of in
# the task graph, which the scheduler receives, holds and forwards (dask warns past 10 MB).
SCATTER_BYTES = 1 << 20
# The bound on connecting to the scheduler and on the calls that take one (the membership poll, a
# scatter, fetching a result).
RPC_TIMEOUT = 30.0
# Connecting again only to clean up after a client closed under the engine: not for long.
CLEANUP_TIMEOUT = 5.0
# How long the engine waits for a retired worker's record of the chunks it was running (see
# retired_chunks); ~0.1 s when it comes. Past it, those chunks run again uncharged.
RETIRE_RECORD_WAIT = 5.0
# How long shutdown(kill=True) waits for the end records of the chunks it killed (see
# ended_within): the worker notices the cancel (CANCEL_POLL), kills its lanes (their grace) and
# records how far each chunk got. Past it, a chunk is answered as if it never ran.
KILL_RECORD_WAIT = 3.0
# An engine on a cluster with no worker yet waits this long for one, then says so.
FIRST_WORKER_TIMEOUT = 30.0

# How long each worker of our own cluster gets to close at shutdown; its nanny kills it after
# 0.8 x this. Closing takes a worker ~0.25 s of CPU (its comms, the interpreter's exit): 0.25 s
# of wall time on an idle machine, 2-3 s beside four busy processes on 2 cores, and more than
# dask's default wait of 4 s (0.8 x 5 s) under the loads seen here, when the nanny printed
# "Worker process still alive after 4.0 seconds, killing" and SIGKILLed it. A worker that
# closes in time costs nothing of this; a hung one delays shutdown by up to 0.8 x this.
WORKER_CLOSE_TIMEOUT = 20.0
# Our in-process cluster shares this machine's cores with the lanes doing the work, so dask's
# background sampling is paid for in item throughput. Measured idle on 2 cores: each worker
# process burnt 4.4% of a core and the client's event loop (which hosts the scheduler) 5%, about
# 7% of the machine, mostly the worker's statistical profiler (a stack sample every 10 ms, for a
# dashboard nobody sees here: it listens on a random port) and 20 ms event-loop ticks; with the
# settings below, 0.7% and 1.4%. Trade-off: no profile in the dashboard, and the memory monitor
# (it watches the worker process itself, not the lanes, which have their own max_rss check) and
# the blocked-loop warning react within 0.5 s instead of 0.1 s / 20 ms. A cluster at an
# ``address`` keeps its own settings.
OWN_CLUSTER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,  # we decide what a worker's death means
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def connect(workers: int, address: str | None, client: Any,
            mem_per_task: int | None = None) -> tuple[Any, Any]:
    """(the cluster we started or None, the client to use)."""
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"backend must be 'local', 'serial', 'dask' or a distributed.Client, "
                            f"not {type(client).__name__}")
        if client.asynchronous:  # its calls return coroutines that our thread could never await
            raise TypeError(
                "backend= got an asynchronous distributed.Client (asynchronous=True): the engine "
                "drives the cluster from its own thread and needs a synchronous Client; pass "
                "Client(address) without asynchronous=True, or backend='dask', "
                "address='tcp://host:8786' (the async calls, such as map_async, work either way)")
        return None, client
    if address is not None:
        check_address(address)
        try:
            return None, distributed.Client(  # type: ignore[no-untyped-call]
                address, timeout=RPC_TIMEOUT, set_as_default=False)
        except OSError as exc:
            raise OSError(f"cannot reach the dask scheduler at {address}: {exc}") from exc
    # Our own cluster: dask must never re-run a task whose worker died, it samples little in the
    # background (OWN_CLUSTER_CONFIG), and it listens on this machine only. Each worker declares its share of
    # the memory (dask's own default limit) as the MEMORY resource that mem_per_task asks for;
    # at least mem_per_task: a worker count the user insisted on was warned about by the engine
    # (OvercommitWarning) and runs, as it would locally.
    memory = max(distributed.system.MEMORY_LIMIT // workers, mem_per_task or 0)
    with dask.config.set(OWN_CLUSTER_CONFIG):
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # no fixed port to collide on
            memory_limit=memory, resources={MEMORY: memory})
    try:
        return cluster, distributed.Client(  # type: ignore[no-untyped-call]
            cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise


def close_own_cluster(cluster: Any) -> None:
    """Close the cluster we started: its workers first, side by side, each with
    WORKER_CLOSE_TIMEOUT to exit before its nanny kills it (dask's own close gives them 5 s),
    then its scheduler. Raises what ``cluster.close`` raises past RPC_TIMEOUT."""
    try:
        cluster.sync(_close_workers, cluster, callback_timeout=2 * WORKER_CLOSE_TIMEOUT)
    finally:
        cluster.close(timeout=RPC_TIMEOUT)  # the workers are closed already: the scheduler


async def _close_workers(cluster: Any) -> None:
    await asyncio.gather(*(nanny.close(timeout=WORKER_CLOSE_TIMEOUT, reason="stagepool-shutdown")
                           for nanny in list(cluster.workers.values())), return_exceptions=True)


def check_address(address: str) -> None:
    """Raise ``ValueError`` naming ``address`` if it cannot be a scheduler's address (an unknown
    scheme, no port), before a ``Client`` is built on it: dask finds out only halfway through
    the Client's construction, and the half-made Client then holds the interpreter's exit for
    60 s trying to close a connection it never opened."""
    try:
        scheme, _ = parse_address(address)
        get_backend(scheme)  # an unknown scheme raises
        if scheme != "inproc":  # a host and a port
            get_address_host_port(address)
    except ValueError as exc:
        raise ValueError(f"address={address!r} is not a dask scheduler address such as "
                         f"'tcp://10.0.0.5:8786': {exc}") from None


def wait_for_first_worker(client: Any, address: str) -> None:
    """Wait up to FIRST_WORKER_TIMEOUT for a worker; raise ``RuntimeError`` saying how to start
    one if none came."""
    try:
        client.wait_for_workers(1, timeout=FIRST_WORKER_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(
            f"the dask cluster at {address} has no worker after "
            f"{FIRST_WORKER_TIMEOUT:g} s; start some with: dask worker {address}"
        ) from None


def workers_info(client: Any) -> dict[str, dict[str, Any]]:
    """The scheduler's view of each worker (threads, status, resources, memory_limit, ...), by
    address; raises (OSError, TimeoutError) when the scheduler does not answer in RPC_TIMEOUT."""
    info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=RPC_TIMEOUT)
    return dict(info["workers"])


def left_gracefully(client: Any, address: str) -> bool:
    """Whether the worker that was at ``address`` was retired (``retire_workers``, a scale-down,
    ``dask worker`` stopped by SIGTERM): its last departure followed a change to
    ``closing_gracefully``. False when it died, was killed, or the scheduler cannot say."""
    try:
        events = client.sync(client.scheduler.events, topic=address, callback_timeout=RPC_TIMEOUT)
    except Exception:  # the scheduler is unreachable: assume the worse, as before
        return False
    graceful = False
    for _when, event in events:
        action = event.get("action") if isinstance(event, dict) else None
        if action == "worker-status-change" and event.get("status") == "closing_gracefully":
            graceful = True
        elif action == "add-worker" or (action == "worker-status-change" and
                                        event.get("status") == "running"):
            graceful = False  # a new worker at that address, or its retirement was called off
    return graceful


def chunks_ended(client: Any, name: str, address: str) -> dict[str, dict[str, Any]]:
    """The end records of engine ``name``'s chunks on the worker at ``address``, by key
    (``HostPlugin._record_end``: the key and how the chunk ended); empty when the scheduler
    cannot say."""
    return {event["key"]: event for event in _records(client, name, address)
            if isinstance(event.get("key"), str)}


def ended_within(client: Any, name: str, address: str, keys: set[str],
                 wait: float) -> dict[str, dict[str, Any]]:
    """:func:`chunks_ended` once the records of every one of ``keys`` are there, or ``wait``
    seconds have passed (then what there is)."""
    deadline = time.monotonic() + wait
    while True:
        ended = chunks_ended(client, name, address)
        if keys <= ended.keys() or time.monotonic() >= deadline:
            return ended
        time.sleep(0.05)


def retired_chunks(client: Any, name: str, address: str) -> dict[str, int | None] | None:
    """What the retired worker at ``address`` recorded, as it closed, of engine ``name``'s
    chunks it was running (``HostPlugin._record_retirement``): per key, how many items had
    started. The worker sends it after the scheduler has let it go, so it is waited for, up to
    RETIRE_RECORD_WAIT; None when none came (the worker was killed as it closed, say)."""
    deadline = time.monotonic() + RETIRE_RECORD_WAIT
    while True:
        for event in _records(client, name, address):
            if isinstance(event.get(RETIRED), dict):
                return dict(event[RETIRED])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _records(client: Any, name: str, address: str) -> list[dict[str, Any]]:
    """Engine ``name``'s records from the worker at ``address`` ([] when the scheduler cannot
    say: what the client saw finish is then all we know)."""
    try:
        events = client.sync(client.scheduler.events, topic=ended_topic(name, address),
                             callback_timeout=RPC_TIMEOUT)
    except Exception:
        return []
    return [event for _when, event in events if isinstance(event, dict)]


def submit_chunk(client: Any, name: str, key: str, address: str, task: Task,
                 resources: dict[str, float] | None) -> tuple[Any, Any]:
    """Submit one chunk as the task ``key``, pinned to the worker at ``address`` (its payload
    scattered there first if big) and asking for ``resources``; return (the dask future, the
    scattered payload's future or None). Raises what dask raises when the worker just left or
    the client is closing."""
    payload: Any = task.items
    data = None
    if payload.nbytes > SCATTER_BYTES:
        payload = data = client.scatter(payload, workers=[address], hash=False,
                                        direct=direct(client), timeout=RPC_TIMEOUT)
    future = client.submit(
        run_chunk, name, key, task.fn_key, task.fn, payload, task.n_items,
        task.timeouts, task.per_item_clock, key=key, workers=[address],
        allow_other_workers=False, pure=False, retries=0, resources=resources)
    return future, data


def direct(client: Any) -> bool:
    """Whether big payloads go straight from the client to the worker (one network hop) rather
    than through the scheduler, which receives each one whole and forwards it (two hops, and the
    scheduler's memory and CPU): yes unless the client was told otherwise
    (``Client(direct_to_workers=False)``, or the ``distributed.client.direct-to-workers``
    setting, for a client that cannot reach the workers, behind a gateway say)."""
    return client.direct_to_workers is not False


def worker_lane_pids(client: Any, name: str) -> list[int]:
    """The pids of engine ``name``'s lanes on every worker (on their hosts: a remote pid names a
    remote process); [] if the client is closing."""
    try:
        per_worker = client.run(lane_pids, name, on_error="return")
    except Exception:  # the client is closing
        return []
    return sorted(pid for pids in per_worker.values() if isinstance(pids, list) for pid in pids)


def unregister(client: Any, address: str, name: str) -> None:
    """Remove plugin ``name`` from the workers, which kill our lanes there; through a client of
    our own if ``client`` was closed under the engine (else the lanes would idle on a shared
    cluster until its workers exit)."""
    if client.status not in ("closing", "closed"):
        client.unregister_worker_plugin(name)
        return
    with distributed.Client(  # type: ignore[no-untyped-call]
            address, security=client.security, timeout=CLEANUP_TIMEOUT,
            set_as_default=False) as fresh:
        fresh.unregister_worker_plugin(name)
