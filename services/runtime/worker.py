"""Runs model work on one dedicated thread per engine and times each call.

The event loop stays free for health checks and other RPCs while a forward runs; one
thread per engine also serialises access to its KV cache without locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from specmesh.v1 import common_pb2

T = TypeVar("T")


class Clock:
    """Per-call timing: queue (waiting for the engine thread), forward (engine time), total."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.queue_ns = self.forward_ns = 0

    def timing(self) -> common_pb2.Timing:
        return common_pb2.Timing(
            queue_ns=self.queue_ns, forward_ns=self.forward_ns, total_ns=time.perf_counter_ns() - self.start
        )


class EngineWorker:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{name}")

    async def run(self, clock: Clock, fn: Callable[..., T], *args) -> T:
        submitted = time.perf_counter_ns()

        def timed() -> T:
            began = time.perf_counter_ns()
            clock.queue_ns += began - submitted
            try:
                return fn(*args)
            finally:
                clock.forward_ns += time.perf_counter_ns() - began

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
