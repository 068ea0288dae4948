"""Relaying a whole service through the gateway: the calls of ScoringService (gateway/scoring.py)
and ImageService (gateway/image.py) go, unchanged, to a pool of replicas of that service, so
clients reach them at the gateway's address (with its token, TLS and tracing).

These calls carry no session, so any replica can answer any call: each goes to the replica with
the fewest calls in flight from this gateway. A replica that goes away (UNAVAILABLE, or CANCELLED
the gateway did not ask for) before it sent anything is left out of choice for a moment and the
call is sent to another; a replica whose queue is full (RESOURCE_EXHAUSTED with a RetryInfo) is
waited for as generation calls wait (``gateway.policies.calls``). Any other status, the replica's
message and field violations included, reaches the client unchanged (``services.runtime.errors``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from services.core.errors import Unavailable

from .policies.calls import BUSY_RETRIES, busy_wait, replica_gone
from .pool import UpstreamPool


class Relay:
    """Sends calls to `pool` (None: each call is UNIMPLEMENTED with the message `not_configured`).
    `upstream_timeout_s` bounds a call whose client set no deadline (a stream: all of it)."""

    def __init__(
        self, pool: UpstreamPool | None, not_configured: str, upstream_timeout_s: float | None = None
    ) -> None:
        self.pool = pool
        self.not_configured = not_configured
        self.upstream_timeout_s = upstream_timeout_s

    async def unary(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The reply of the unary `method` of some replica."""
        (reply,) = [reply async for reply in self._relay(method, request, context, stream=False)]
        return reply

    def stream(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The messages of the server-streaming `method` of some replica, each as it arrives."""
        return self._relay(method, request, context, stream=True)

    async def _relay(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> AsyncIterator[Any]:
        if self.pool is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, self.not_configured)
        pool = self.pool
        gone: list[str] = []  # replicas that went away during this call
        busy = 0
        last_error: grpc.aio.AioRpcError | None = None
        while True:
            try:
                replica = await pool.choose(avoid=gone)
            except Unavailable:
                if last_error is not None:
                    raise last_error from None
                raise
            replica.sessions += 1  # the load measure: calls in flight from this gateway
            call = getattr(replica.stub, method)(request, timeout=self._timeout(context))
            relayed = False
            try:
                if stream:
                    async for message in call:
                        relayed = True
                        yield message
                else:
                    yield await call
                return
            except grpc.aio.AioRpcError as exc:
                if replica_gone(exc):
                    pool.mark_down(replica, exc.code().name)  # the next calls go elsewhere
                # Once a message has reached the client, a retry would start the stream over on
                # another replica: the client would get the messages it has again, from another
                # run (images counted from token 0 again), with no way to tell them apart. Only
                # the client can decide to ask again, so the error goes to it.
                if relayed:
                    raise
                if replica_gone(exc):
                    gone.append(replica.address)
                    last_error = exc
                    continue
                wait = busy_wait(exc, context.time_remaining()) if busy < BUSY_RETRIES else None
                if wait is None:
                    raise
                busy += 1
                await asyncio.sleep(wait)
            finally:
                # a client that cancels (or goes away) ends this generator here: the replica
                # stops working for it at once (a no-op on a call that has finished)
                call.cancel()
                replica.sessions -= 1

    def _timeout(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return remaining if remaining is not None else self.upstream_timeout_s
