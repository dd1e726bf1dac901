"""The dask backend: chunks run on a dask.distributed cluster, one dask task per chunk. The only
module that imports ``distributed``, and only when ``backend="dask"`` is asked for: importing it
takes a noticeable fraction of a second and registers ~185 exception reducers in
``copyreg.dispatch_table``, which every pickler that copies that table pays for on each message
(ours do not copy it: with distributed imported, the local codec's pickling measured the same).

    Engine thread(s) --submit(Task)--> FairShare queue
                                          |
                  [dispatcher thread] --client.submit(_run_chunk, pinned to a worker with a free
                          |              slot or one chunk ahead; big payloads scattered first)
                          |                                      |
                          |              dask worker: _run_chunk -> this engine's _HostPlugin
                          |                 -> a hosted LocalBackend (one lane per slot)
                          |                 -> lane process: _worker_loop.run_chunk, the shared record
                          |  <--answer bytes | LaneDied (exact item, address) | Cancelled------/
                          |  <--the dask worker died: LaneDied(offset -1, or "lost" if the
                          |     chunk had ended); it retired: "lost" (the items it had
                          |     started) and the rest requeued
                  Task.on_done(result | LaneDied | Cancelled)

Why a backend hosted inside each dask worker (a WorkerPlugin per engine) and not the item run in
the dask worker's own thread: everything the local backend guarantees comes with it, from code
we already trust. An item that segfaults kills a lane, not the dask worker (whose death would
fail every chunk it ran, and which dask would then count against the task); the shared record
names the exact item; a timeout kills the lane's whole process tree (dask has no way to stop a
running task); memory caps and initializers work per lane. The dask worker never unpickles
anything of the caller's: items travel as the opaque bytes of our codec, so an argument whose
unpickling crashes or imports heavy modules does so in a lane. What remains dask's is placement,
transport and the cluster's membership.

Slots: a worker runs as many of our chunks at once as it has threads, fewer when
``mem_per_task`` says so (its ``MEMORY`` resource, else its ``memory_limit``: see ``_memory``).
Each slot also holds one chunk ahead, waiting in the worker's own queue, so that no slot idles
for the round trip between one chunk's end and the next one's arrival (``_roster.AHEAD``; only
short chunks of known length, and only where dask cannot start it beside the running ones).

Faults, and why no item is blamed twice or wrongly:

* A worker holds at most two of our chunks per slot: each chunk is pinned to a worker with room
  (``workers=[address]``, ``allow_other_workers=False``), the rest wait in our queue. Dask starts
  a worker's chunks in the order they were sent, so when a worker dies, its oldest ``slots``
  chunks that had not ended are the ones that may have been running: only those are answered
  ``LaneDied(offset=-1)``; the younger ones run again elsewhere unblamed. An ended one
  whose answer died with the worker is answered from its end record: the lanes' own
  ``LaneDied`` if that was its answer, else ``LaneDied(reason="lost")``: every item ran and
  none is to blame, so the batch counts that run in ``attempts`` and runs them again (or,
  with ``rerun_innocent=False``, reports each result lost, naming the worker's address).
  "Ended" is what dask told us, or what the worker recorded with the scheduler (an event
  under ``ended_topic``, saying how it ended) before this chunk's thread was free to start
  the one waiting behind it: that record waits for the scheduler's word, so a
  worker killed by the next chunk's first item, in the moment before dask told us that the
  previous one finished, never passes for one killed while running the previous one (which
  blamed an innocent item in 2 of 3 runs before). The one window left: a worker killed from
  outside right after a chunk ended, with nothing of ours waiting behind it (that end is
  recorded without waiting), counts that chunk as possibly running. An item cannot kill its
  dask worker by crashing: it runs in a lane. Only an outside kill can, or an item that
  signals its parent.
* Dask itself never re-runs our tasks elsewhere (``retries=0``; a pinned task cannot move) and
  never decides a verdict for us: the dispatcher polls the cluster's membership and ends each
  chunk of a worker that left exactly once (a ``KilledWorker`` that arrives later is ignored).
  A chunk answered ``LaneDied(offset=-1)`` runs again in halves until the guilty item is alone,
  so a worker killed by an item (or by anyone) fails at most the one item it was running. The
  in-process cluster also sets ``allowed-failures`` to 0, so dask reports such a death at once.
* A worker that is retired (``retire_workers``, a scale-down, ``dask worker`` stopped by
  SIGTERM: the scheduler's events say it was ``closing_gracefully``) is nobody's crash. Dask
  does not wait for its running tasks (only for the results it holds, which it moves to other
  workers): it closes at once, and our lanes there are killed mid-chunk. As it closes, its
  plugin records with the scheduler how many items of each running chunk had started; those
  count that run (``LaneDied(reason="lost", ran=k)``: run again, charged, or with
  ``rerun_innocent=False`` reported lost), and the rest of the chunk, the chunks waiting
  there, and any chunk without such a record go back to the front of our queue, charged
  nothing. A chunk dask saw finish there waits for its (moved) result.
* Cancelling a batch withdraws its queued chunks (those still in our queue, and those sent ahead
  to a worker's queue: their dask futures are cancelled before they start); its running
  ones finish and their answers are dropped, as locally, unless ``kill_running``: then their dask
  futures are cancelled and the worker side, which watches its task's state while it waits,
  kills the lanes running them. A client that disconnects gets the same from the scheduler.

Big numpy arrays: no shared memory between the client and its workers (they may be on other
machines). A payload is the codec's pickle viewed as a ``uint8`` array, which dask sends as an
out-of-band pickle-5 buffer (no copy into a message); arrays of ``_frames.FRAME_BYTES`` and more
leave the pickle and travel beside it as frames of their own, uncopied, and the dask worker hands
them to its lanes through shared memory on its host (``_frames``); answers come back the same way.
A host without room in /dev/shm for a chunk's frames answers ``NoRoom``, nothing run, and the
client sends that chunk again as one pickle, charged nothing (``Flights._refused``). Payloads over
``SCATTER_BYTES`` are scattered straight to the chosen worker rather than through the scheduler
(unless the client was told not to reach its workers directly); answers come back through the
scheduler (``_flights.on_future_done`` says why).

The package: ``_plugin`` is what runs inside a dask worker (the plugin and the task function, which
dask workers unpickle by reference), ``_cluster`` the calls that reach the cluster (connect,
submit a chunk, membership, clean up), ``_memory`` the slots ``mem_per_task`` leaves a worker
(pure), ``_frames`` big arrays as dask frames, ``_roster`` the workers as the dispatcher sees
them (``_versions``: only those running the caller's stagepool), ``_flights`` the book of
running chunks and every way one ends, ``_client`` the ``DaskBackend`` and its dispatcher thread.
"""

from ._client import CAPABILITIES, DaskBackend, PickleCodec

__all__ = ["CAPABILITIES", "DaskBackend", "PickleCodec"]
