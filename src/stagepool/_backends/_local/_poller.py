"""The pool thread's wait: one ``poll`` object kept from turn to turn.

``multiprocessing.connection.wait`` builds a selector, registers every object and closes it again
on each call: about 65 us a turn with seven objects here, paid once or twice per chunk, which is
most of the parent's per-chunk cost for tiny items. The set of objects the pool thread watches
rarely changes (a lane's pipe while it has tasks, sentinels and stderr while it lives), so the
poll object is updated by difference instead: nothing to do on most turns.

``select.poll`` keeps no kernel state between calls (unlike epoll), so a descriptor that was
closed and whose number was reused elsewhere is harmless: it is polled under its new owner only
while that owner is watched.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import Any

__all__ = ["Poller"]

_READY = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def _fileno(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


class Poller:
    """Waits until one of the watched objects (file descriptors, or objects with ``fileno()``:
    connections, process sentinels) is readable, closed or failed."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._watched: dict[int, Any] = {}

    def wait(self, objects: Iterable[Any], timeout: float | None) -> list[Any]:
        """The objects that are ready, after at most ``timeout`` seconds (None: no limit)."""
        by_fd = {_fileno(obj): obj for obj in objects}
        if by_fd.keys() != self._watched.keys():
            for fd in self._watched.keys() - by_fd.keys():
                self._poll.unregister(fd)
            for fd in by_fd.keys() - self._watched.keys():
                self._poll.register(fd, _READY)
        self._watched = by_fd
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return [by_fd[fd] for fd, _event in self._poll.poll(ms)]
