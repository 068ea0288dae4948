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
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from services.core.errors import ResourceExhausted
from services.runtime.batching import ForwardBatcher, Job
from specmesh.v1 import common_pb2

T = TypeVar("T")

# the wait a refused call is told to take: a couple of forwards of a small model, after which
# a full queue has usually drained a little (google.rpc.RetryInfo on the wire)
RETRY_DELAY_S = 0.1


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
    """The engine thread: runs jobs one at a time, or, once a batcher engine is attached
    (:meth:`attach`), interleaved so that their forwards merge (services.runtime.batching)."""

    def __init__(
        self,
        name: str,
        threads: int | None = None,
        *,
        window_s: float = 0.002,
        max_batch: int = 32,
        max_queue: int = 256,
    ) -> None:
        """threads: torch intra-op threads of the engine thread (None = torch's default).
        max_queue: calls admitted at once (waiting or running); more get RESOURCE_EXHAUSTED."""
        self.batcher = ForwardBatcher(window_s=window_s, max_batch=max_batch)
        self.max_queue = max_queue
        self.in_flight = 0  # calls submitted by run() and not yet answered (event loop side)
        self._thread = threading.Thread(
            target=self._serve, args=(threads,), name=f"engine-{name}", daemon=True
        )
        self._thread.start()

    def _serve(self, threads: int | None) -> None:
        _set_torch_threads(threads)
        self.batcher.run_forever()

    def attach(self, engine) -> None:
        """Merge the forwards of concurrent calls on `engine` (dynamic batching)."""
        self.batcher.attach(engine)

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run fn on the engine thread and wait for it (start-up work such as loading weights)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def deliver(ok: bool, value) -> None:
            done.set_result(value) if ok else done.set_exception(value)

        self.batcher.inbox.put(Job(fn, args, deliver))
        return done.result()

    async def run(
        self, clock: Clock, fn: Callable[..., T], *args, key: str | None = None, bounded: bool = True
    ) -> T:
        """Run fn(*args) on the engine thread. key: calls with the same key (a session id) run one
        after the other, never interleaved. A bounded call is refused with RESOURCE_EXHAUSTED
        beyond max_queue; clean-up (releasing a session's KV) is never refused."""
        if bounded and self.in_flight >= self.max_queue:
            raise ResourceExhausted(
                f"the engine has {self.in_flight} calls queued (max_queue={self.max_queue}); "
                f"retry after a short delay (about {RETRY_DELAY_S * 1e3:.0f} ms) or on another replica",
                retry_delay_s=RETRY_DELAY_S,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def resolve(ok: bool, value) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def deliver(ok: bool, value) -> None:
            clock.queue_ns += (job.started_ns or time.perf_counter_ns()) - job.submitted_ns
            clock.forward_ns += job.engine_ns
            loop.call_soon_threadsafe(resolve, ok, value)

        job = Job(fn, args, deliver, key=key, cancelled=future.cancelled)
        self.in_flight += 1
        try:
            self.batcher.inbox.put(job)
            return await future
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self.batcher.inbox.put(None)
        self._thread.join()


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch  # here, not at module level: the gateway uses this package without torch

        torch.set_num_threads(threads)
