"""Which dask workers run the caller's stagepool. The engine's plugin and tasks change between
versions (a worker of another one failed with "TypeError: HostPlugin.__init__() takes 4
positional arguments but 5 were given", deep in its log), so each worker is asked for its
version before it is sent anything: a mismatch at ``Engine()`` is an error naming both versions
and the worker; a worker that joins later is left out (sent nothing) with a warning naming it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["LOGGER", "mismatched", "refusal", "worker_version"]

LOGGER = logging.getLogger("stagepool.dask")

# The bound on asking the workers (one broadcast through the scheduler).
ASK_TIMEOUT = 30.0


def _version() -> str:
    # The package is imported whenever this module is; read through sys.modules because the
    # backends sit below the package's top level in the layers (no import points up).
    return str(getattr(sys.modules["stagepool"], "__version__", "unknown"))


def worker_version() -> str:
    """Run by ``client.run`` on a dask worker: its stagepool's version. A worker without
    stagepool (or with one older than this check) fails to unpickle it: see ``mismatched``."""
    return _version()


def mismatched(client: Any, addresses: list[str]) -> dict[str, str]:
    """The workers at ``addresses`` whose stagepool is not ours: per address, what it runs
    ("unknown: <why>" when asking failed). Raises (OSError, TimeoutError) when the scheduler does
    not answer in ASK_TIMEOUT: then none is vetted, and the caller asks again later."""
    answers = client.run(worker_version, workers=addresses, on_error="return",
                         callback_timeout=ASK_TIMEOUT)
    ours = _version()
    found = {address: answer if isinstance(answer, str) else f"unknown ({answer!r})"
             for address, answer in answers.items()}
    return {address: theirs for address, theirs in found.items() if theirs != ours}


def refusal(address: str, theirs: str) -> str:
    """Why the worker at ``address``, running stagepool ``theirs``, gets nothing of ours."""
    return (f"the dask worker at {address} runs stagepool {theirs}, but this engine runs "
            f"stagepool {_version()}: every worker must run the caller's version (the tasks and "
            f"the worker plugin change between versions); install stagepool=={_version()} there")
