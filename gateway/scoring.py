"""The gateway's scoring front door: specmesh.v1.ScoringService served by the gateway and relayed
to a pool of scoring replicas (``gateway.relay``: replica choice, failover, RetryInfo waits), so
clients reach detection, membership, uncertainty and attribution at the same address (and with
the same token, TLS and tracing) as generation.
"""

from __future__ import annotations

from specmesh.v1 import scoring_pb2, scoring_pb2_grpc

from .pool import UpstreamPool
from .relay import Relay

SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
NOT_CONFIGURED = (
    "this gateway has no scoring service: start it with --scoring HOST:PORT "
    "(specmesh serve scoring; `specmesh up --scoring` does both)"
)


class ScoringFrontDoor(scoring_pb2_grpc.ScoringServiceServicer):
    """Relays every ScoringService call to `pool` (None: each call is UNIMPLEMENTED, saying why).
    `upstream_timeout_s` bounds a call whose client set no deadline."""

    def __init__(self, pool: UpstreamPool | None, upstream_timeout_s: float | None = None) -> None:
        self.relay = Relay(pool, NOT_CONFIGURED, upstream_timeout_s)

    async def Detect(self, request: scoring_pb2.DetectRequest, context) -> scoring_pb2.DetectResponse:
        return await self.relay.unary("Detect", request, context)

    async def Membership(
        self, request: scoring_pb2.MembershipRequest, context
    ) -> scoring_pb2.MembershipResponse:
        return await self.relay.unary("Membership", request, context)

    async def Uncertainty(
        self, request: scoring_pb2.UncertaintyRequest, context
    ) -> scoring_pb2.UncertaintyResponse:
        return await self.relay.unary("Uncertainty", request, context)

    async def Attribute(
        self, request: scoring_pb2.AttributeRequest, context
    ) -> scoring_pb2.AttributeResponse:
        return await self.relay.unary("Attribute", request, context)
