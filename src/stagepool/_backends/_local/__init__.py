"""The local backend: worker processes on this machine, started with loky (the only loky import).

    _pool.py       LocalBackend: the Backend protocol and the pool thread's loop
    _lanes.py      a worker process and its pipes, stderr, and what it may take
    _limits.py     per-item deadlines from the shared record (pure)
    _record.py     the parent's side of the shared record (which item each worker is on)
"""

from ._pool import CAPABILITIES, LocalBackend

__all__ = ["CAPABILITIES", "LocalBackend"]
