"""Runs model work on one dedicated thread per engine and times each call.

The event loop stays free for health checks and other RPCs while a forward runs; one
thread per engine also serialises access to its KV cache without locks.

All of a process's torch work (loading the weights included) belongs on this thread: every
thread that runs a parallel torch op gets its own OpenMP team, and once a process holds more
OpenMP threads than there are cores, libgomp stops spinning between parallel regions and
every region pays a thread wake-up. Measured on 2 cores with SmolLM2-135M at 2 threads:
31 ms per decode step when one thread does all the work, 53-66 ms once a second thread has
run torch ops too.
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
    def __init__(self, name: str, threads: int | None = None) -> None:
        """threads: torch intra-op threads of the engine thread (None = torch's default)."""
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"engine-{name}", initializer=_set_torch_threads, initargs=(threads,)
        )

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run fn on the engine thread and wait for it (start-up work such as loading weights)."""
        return self._executor.submit(fn, *args).result()

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


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch  # here, not at module level: the gateway uses this package without torch

        torch.set_num_threads(threads)
