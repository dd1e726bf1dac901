"""``engine.with_options(timeout=..., retries=..., retry_on=..., backoff=...)``: the engine's calls
with other failure options, on the same workers.

Keyword arguments of ``submit`` belong to the function (``submit(fn, *args, **kwargs)``, as in
``concurrent.futures``), so per-call options cannot go there; a view holds them instead. A view is
cheap (a few objects, no process, no thread): make one per call if that reads best.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ._aio import AsyncCalls
from ._answers import BatchPolicy
from ._backends import Backend
from ._calls import Calls, serial_cannot
from ._config import (
    DEFAULT,
    Default,
    EngineConfig,
    Timeout,
    check_backoff,
    check_int,
    check_retry_on,
    check_timeout,
)
from ._single import ExecutorView, SubmitContext

__all__ = ["EngineView"]


class EngineView(AsyncCalls):
    """``map``, ``imap``, ``submit``, their async forms and ``executor``, run by ``engine``'s
    workers with this view's ``timeout``, ``retries``, ``retry_on`` and ``backoff`` (the others
    are the engine's). Calls through views and through the engine share the workers fairly.

    Failure handling and cancellation are those of the engine's calls. The view has no workers
    of its own: it works while the engine is open (then calls raise ``EngineClosed``), and its
    ``shutdown`` (also through ``executor`` or ``async with``) shuts the engine down.
    """

    def __init__(self, engine: Calls, *, timeout: Timeout | Default, retries: int | Default,
                 retry_on: Any, backoff: float | Default) -> None:
        self._engine = engine
        self.config = _options(engine.config, timeout, retries, retry_on, backoff)
        backend = engine._backend_or_raise()
        if self.config.timeout is not None and not backend.capabilities.hard_timeouts:
            raise ValueError(serial_cannot("timeout"))
        cfg = self.config
        self._policy: BatchPolicy = dataclasses.replace(
            engine._policy, retries=cfg.retries, retry_on=cfg.retry_on, backoff=cfg.backoff)
        self._submits = SubmitContext(backend, self._policy, cfg.timeout)
        self._lock = threading.Lock()
        self._executor: ExecutorView | None = None

    def with_options(self, *, timeout: Timeout | Default = DEFAULT,
                     retries: int | Default = DEFAULT, retry_on: Any = DEFAULT,
                     backoff: float | Default = DEFAULT) -> EngineView:
        """Another view of the same engine, starting from this view's options."""
        cfg = self.config
        return EngineView(
            self._engine, timeout=cfg.timeout if timeout is DEFAULT else timeout,
            retries=cfg.retries if retries is DEFAULT else retries,
            retry_on=cfg.retry_on if retry_on is DEFAULT else retry_on,
            backoff=cfg.backoff if backoff is DEFAULT else backoff)

    def _backend_or_raise(self) -> Backend:
        return self._engine._backend_or_raise()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 kill: bool = False) -> None:
        """Shut the engine down (see ``Engine.shutdown``)."""
        self._engine.shutdown(wait, cancel_futures=cancel_futures, kill=kill)

    def __repr__(self) -> str:
        cfg = self.config
        return (f"<stagepool.EngineView timeout={cfg.timeout!r} retries={cfg.retries} "
                f"retry_on={cfg.retry_on!r} of {self._engine!r}>")


def _options(config: EngineConfig, timeout: Timeout | Default, retries: int | Default,
             retry_on: Any, backoff: float | Default) -> EngineConfig:
    """The engine's settings with these options, validated as ``Engine()`` validates them."""
    tries = config.retries if retries is DEFAULT else check_int(retries, "retries", minimum=0)
    return dataclasses.replace(
        config, timeout=config.timeout if timeout is DEFAULT else check_timeout(timeout),
        retries=tries,
        retry_on=config.retry_on if retry_on is DEFAULT else check_retry_on(retry_on),
        backoff=check_backoff(config.backoff if backoff is DEFAULT else backoff, tries))


# Public classes name the package they are imported from, in reprs and tracebacks.
EngineView.__module__ = "stagepool"
