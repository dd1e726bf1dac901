"""What does a dask worker without room in /dev/shm cost stagepool's big-array path?

Arrays of 1 MiB and more travel to a dask worker as frames, which the worker copies into
/dev/shm for its lanes. A host without room for them (a container's default /dev/shm is 64 MiB)
answers "no room", and the client sends the chunk again as one pickle, through the lanes' pipe
(results come back in-band too). Side by side in one run, in alternating rounds, ``a + 1`` on
the arrays of ``benchmarks.dask_arrays``: ``client.map`` + ``gather`` and stagepool on a cluster
with room, and stagepool on a cluster whose worker processes cannot write a file over 1 MiB
(``RLIMIT_FSIZE``: a segment then fails with EFBIG, as one in a full /dev/shm fails with ENOSPC).
Prints best and median seconds and each row's speed as a ratio of ``client.map``'s; writes
``dask_no_room.json``.

    python -m benchmarks.dask_no_room [--workers 1] [--rounds 3] [--big 2] [--medium 32]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Callable
from typing import Any

import stagepool as sp
from benchmarks.dask_arrays import alternate, inc, shapes, show, write

NO_ROOM = "stagepool, no room in /dev/shm"


def cramp(limit: int) -> None:
    """Run in a dask worker: files it and its future lanes write stop at ``limit`` bytes (Python
    ignores SIGXFSZ: the write fails with EFBIG instead of killing the process)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def rows(client: Any, roomy: sp.Engine, cramped: sp.Engine) -> dict[str, Callable[[list[Any]], list[Any]]]:
    def dask_map(arrays: list[Any]) -> list[Any]:
        return list(client.gather(client.map(inc, arrays, pure=False)))

    return {"dask client.map+gather": dask_map,
            "stagepool, room in /dev/shm": lambda arrays: list(roomy.map(inc, arrays).values),
            NO_ROOM: lambda arrays: list(cramped.map(inc, arrays).values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="per cluster (there are two)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=2)
    parser.add_argument("--medium", type=int, default=32)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    warnings.filterwarnings("ignore", message="Sending large graph")
    logging.getLogger("stagepool.dask").setLevel(logging.ERROR)  # its one "no room" warning
    inputs = shapes(args.big, args.medium)
    with contextlib.ExitStack() as stack:
        clients = []
        for _ in range(2):
            cluster = stack.enter_context(LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True,
                dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR))
            clients.append(stack.enter_context(Client(cluster, set_as_default=False)))
        clients[1].run(cramp, 1 << 20)
        roomy = stack.enter_context(sp.Engine(backend=clients[0]))
        cramped = stack.enter_context(sp.Engine(backend=clients[1]))
        summary = show(alternate(rows(clients[0], roomy, cramped), inputs, args.rounds))
    write(args, "dask_no_room.json", summary)


if __name__ == "__main__":
    main()
