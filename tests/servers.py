"""Run a real grpc.aio server on a background event loop so tests can use blocking clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class ServerThread:
    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=120)
        return self

    @property
    def address(self) -> str:
        return self.server.address

    def call(self, coro: Awaitable[Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop(grace=1))
        self.call(_cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _cancel_the_rest() -> None:
    """Cancel and await the tasks still on the loop (a servicer's idle-session sweep), as
    asyncio.run does at its end: a task left pending on a stopped loop is reported ("Task was
    destroyed but it is pending") whenever it is collected, in whichever later test that is."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
