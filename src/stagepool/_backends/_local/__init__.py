"""The local backend: worker processes on this machine, forked from a warm template (loky's
fork+exec where that is not possible: the only loky import).

    _pool.py       LocalBackend: the Backend protocol, the pool thread's loop, dispatch, stopping
    _returns.py    what comes back from a worker: an answer, or its death (blame, requeue)
    _delivery.py   handing a task its answer; asking whether it still starts
    _crew.py       the workers' lifecycle: spawn, retire, reap, kill, respawn, read a death
    _template.py   the parent's side of the warm template that forks the workers
    _cwd.py        loky's worker start in a deleted working directory (/proc/<pid>/cwd)
    _lanes.py      a worker process and its pipes, stderr, and what it may take
    _limits.py     per-item deadlines (pure) and which workers broke a time or memory limit
    _mailbox.py    how other threads wake the pool thread and post calls to it
    _record.py     the parent's side of the shared record (which item each worker is on)
"""

from ._pool import CAPABILITIES, LocalBackend

__all__ = ["CAPABILITIES", "LocalBackend"]
