"""The adapters that run on a dask.distributed cluster: dask's own ``client.map``, joblib's dask
backend, and stagepool's dask backend; each on an in-process ``LocalCluster`` of ``workers``
one-thread worker processes (the shape of the other rows).

Imported only through ``peers`` (whose registry lists them): they build on its adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .peers import Collected, JoblibPeer, Peer, StagepoolPeer

__all__ = ["DaskPeer", "JoblibDaskPeer", "StagepoolDaskPeer", "local_cluster"]


def local_cluster(workers: int) -> tuple[Any, Any]:
    """(LocalCluster of ``workers`` one-thread processes, a Client of it set as the default)."""
    import logging
    import warnings

    from distributed import Client, LocalCluster

    # client.map with big arguments (big-arrays, media) puts them in the task graph, and dask
    # warns about it on every run; the rows' labels say so once.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.CRITICAL)
    return cluster, Client(cluster)


class DaskPeer(Peer):
    """dask.distributed ``LocalCluster(processes=True, threads_per_worker=1)`` + ``client.map``."""

    name = "dask"

    def _start(self) -> None:
        self.cluster, self.client = local_cluster(self.workers)

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        # pure=False: every run computes afresh instead of finding the last run's keys in memory.
        futures = self.client.map(fn, items, pure=False)
        values = self.client.gather(futures)
        del futures
        return list(values)

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        import collections

        futures = collections.deque(self.client.map(fn, list(items), pure=False))
        while futures:
            yield futures.popleft().result()  # the future (and its data) is released as it goes

    def collect(self, fn: Callable[[Any], Any], items: list[Any], *,
                deadline: float | None = None) -> Collected:
        from distributed import wait

        futures = self.client.map(fn, items, pure=False)
        out = Collected()
        try:
            wait(futures, timeout=deadline)
        except TimeoutError:
            out.hung = True
        status = [f.status for f in futures]  # one snapshot: a lost task may change it later
        done = [i for i, s in enumerate(status) if s == "finished"]
        # one gather for all the values (a result() per future is a round trip each)
        out.values = dict(zip(done, self.client.gather([futures[i] for i in done]), strict=True))
        for i, s in enumerate(status):
            if s == "error":
                out.errors[i] = type(futures[i].exception()).__name__
        self.client.cancel(futures)
        return out

    def close(self) -> None:
        self.client.close()
        self.cluster.close()



class StagepoolDaskPeer(StagepoolPeer):
    """stagepool on dask: ``Engine(backend="dask", workers)``, an in-process
    ``LocalCluster(processes=True)`` of that many one-thread workers, each hosting its own
    stagepool worker process; the same calls as the local row. Not judged by stagepool's targets
    (they are the local engine's); it answers "what does the cluster path cost?"."""

    name = "stagepool-dask"
    BACKEND = "dask"

    def _start(self) -> None:
        import logging

        logging.getLogger("distributed").setLevel(logging.ERROR)  # as the dask row: no chatter
        super()._start()


class JoblibDaskPeer(JoblibPeer):
    """joblib ``Parallel(batch_size="auto")`` under ``joblib.parallel_config(backend="dask")``, on
    a ``LocalCluster`` like the dask row's (joblib's dask backend uses the default client)."""

    name = "joblib-dask"

    def _start(self) -> None:
        import joblib

        self.cluster, self.client = local_cluster(self.workers)
        self.config = joblib.parallel_config(backend="dask")
        self.config.__enter__()
        super()._start()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return Peer.imap(self, fn, items)  # the loky row's generator: not this backend's

    def close(self) -> None:
        self.parallel.__exit__(None, None, None)
        self.config.__exit__(None, None, None)
        self.client.close()
        self.cluster.close()
