"""The gateway's scoring front door: specmesh.v1.ScoringService served by the gateway and relayed
to a pool of scoring replicas, so clients reach detection, membership, uncertainty and
attribution at the same address (and with the same token, TLS and tracing) as generation.

Scoring calls carry no session, so any replica can answer any call: each goes to the replica
with the fewest calls in flight from this gateway. A replica that goes away (UNAVAILABLE, or
CANCELLED the gateway did not ask for) is left out of choice for a moment and the call is sent
to another; a replica whose queue is full (RESOURCE_EXHAUSTED with a RetryInfo) is waited for
as generation calls wait (``gateway.policies.calls``). Any other status, the replica's message
and field violations included, reaches the client unchanged (``services.runtime.errors``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio

from services.core.errors import Unavailable
from specmesh.v1 import scoring_pb2, scoring_pb2_grpc

from .policies.calls import BUSY_RETRIES, busy_wait, replica_gone
from .pool import UpstreamPool

SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
NOT_CONFIGURED = (
    "this gateway has no scoring service: start it with --scoring HOST:PORT "
    "(specmesh serve scoring; `specmesh up --scoring` does both)"
)


class ScoringFrontDoor(scoring_pb2_grpc.ScoringServiceServicer):
    """Relays every ScoringService call to `pool` (None: each call is UNIMPLEMENTED, saying why).
    `upstream_timeout_s` bounds a call whose client set no deadline."""

    def __init__(self, pool: UpstreamPool | None, upstream_timeout_s: float | None = None) -> None:
        self.pool = pool
        self.upstream_timeout_s = upstream_timeout_s

    async def Detect(self, request: scoring_pb2.DetectRequest, context) -> scoring_pb2.DetectResponse:
        return await self._relay("Detect", request, context)

    async def Membership(
        self, request: scoring_pb2.MembershipRequest, context
    ) -> scoring_pb2.MembershipResponse:
        return await self._relay("Membership", request, context)

    async def Uncertainty(
        self, request: scoring_pb2.UncertaintyRequest, context
    ) -> scoring_pb2.UncertaintyResponse:
        return await self._relay("Uncertainty", request, context)

    async def Attribute(
        self, request: scoring_pb2.AttributeRequest, context
    ) -> scoring_pb2.AttributeResponse:
        return await self._relay("Attribute", request, context)

    async def _relay(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.pool is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_CONFIGURED)
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
            try:
                return await getattr(replica.stub, method)(request, timeout=self._timeout(context))
            except grpc.aio.AioRpcError as exc:
                if replica_gone(exc):
                    pool.mark_down(replica, exc.code().name)
                    gone.append(replica.address)
                    last_error = exc
                    continue
                wait = busy_wait(exc, context.time_remaining()) if busy < BUSY_RETRIES else None
                if wait is None:
                    raise
                busy += 1
                await asyncio.sleep(wait)
            finally:
                replica.sessions -= 1

    def _timeout(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return remaining if remaining is not None else self.upstream_timeout_s
