"""Blocking work (model inference, database calls) off the event loop, a bounded number at once.

The model runs on ``threads`` worker threads; up to ``max_inflight`` calls are admitted
(running, or waiting for a thread). A request beyond that is refused at once with 503 +
Retry-After instead of joining a longer queue: a long queue in front of a saturated CPU only
turns into timeouts, and the client (or the load balancer) knows best where else to go.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from app.api.errors import Overloaded

P = ParamSpec("P")
T = TypeVar("T")


class InferencePool:
    def __init__(self, max_inflight: int, threads: int, torch_threads: int = 0):
        self.max_inflight = max_inflight
        self.inflight = 0  # touched only on the event loop thread, so no lock is needed
        # torch.set_num_threads sets the calling thread's OpenMP team size, so each worker
        # sets its own; one call made at startup would not reach them.
        self._executor = ThreadPoolExecutor(max_workers=min(threads, max_inflight),
                                            thread_name_prefix="artalign-inference",
                                            initializer=_set_torch_threads, initargs=(torch_threads,))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a worker thread; :class:`Overloaded` when ``max_inflight``
        calls are already admitted."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(self.max_inflight)
        self.inflight += 1
        try:
            call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self.inflight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _set_torch_threads(count: int) -> None:
    if count:
        import torch

        torch.set_num_threads(count)
