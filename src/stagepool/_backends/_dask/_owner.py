"""Whether the engine that installed a plugin on a dask worker still exists, as the worker sees
it: the scheduler's event log of the engine's client. An engine that shuts down removes its plugin
itself; one whose process was SIGKILLed (or lost its network for good) never can, and without
this its lanes idled on every worker for the cluster's lifetime, and came back on every worker
that joined or was restarted, since the scheduler hands its registered plugins to each of them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["OWNER_POLL", "owner", "owner_left", "watch_owner"]

# How often a worker asks the scheduler about the engine's client: one small RPC (the client's
# topic holds at most the scheduler's event-log length, 1000 by default) per worker and engine.
OWNER_POLL = 5.0
# A client that lost its connection reconnects within its connect timeout (dask logs it as
# removed, then added again): its engine counts as gone only after that, plus this margin.
OWNER_MARGIN = 10.0


def owner(client: Any) -> tuple[str, float]:
    """What a worker needs to watch for ``client``'s departure: its id, and how long it may be
    away (its connect timeout, within which it may reconnect, plus OWNER_MARGIN)."""
    reconnect = getattr(client, "_timeout", None)  # dask keeps it private; 30 s by default
    return client.id, float(reconnect or 30.0) + OWNER_MARGIN


def owner_left(events: Iterable[tuple[float, Any]]) -> bool:
    """Whether a client's event topic says it is gone: its last arrival or departure was a
    departure ("remove-client"), or the topic is empty (the scheduler drops a departed client's
    topic an hour later, and a restarted scheduler never knew it). Other events (scatters) say
    nothing either way."""
    last, seen = None, False
    for _when, event in events:
        seen = True
        action = event.get("action") if isinstance(event, dict) else None
        if action in ("add-client", "remove-client"):
            last = action
    return last == "remove-client" or not seen


async def watch_owner(worker: Any, client_id: str, grace: float, plugin: str,
                      watching: Callable[[], bool]) -> None:
    """On a dask worker's event loop, while ``watching()``: once the engine's client has been
    gone for ``grace`` seconds, unregister ``plugin`` from the scheduler (which tears it down on
    every worker, killing its lanes, and stops handing it to workers that join). A scheduler
    that does not answer decides nothing: the next poll asks again."""
    gone_since: float | None = None
    while watching():
        await asyncio.sleep(OWNER_POLL)
        try:
            events = await worker.scheduler.events(topic=client_id)
        except Exception:  # unreachable for now: the worker's own reconnection deals with it
            continue
        if not owner_left(events):
            gone_since = None
            continue
        now = time.monotonic()
        gone_since = now if gone_since is None else gone_since
        if now - gone_since >= grace and watching():
            with contextlib.suppress(Exception):  # another worker may have removed it first
                await worker.scheduler.unregister_worker_plugin(name=plugin)
            return
