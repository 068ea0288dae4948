"""The gateway's image front door: specmesh.v1.ImageService served by the gateway and relayed to
a pool of image replicas (``gateway.relay``: replica choice, failover, RetryInfo waits), so
clients generate images at the same address (and with the same token, TLS and tracing) as text.

Generate is a server stream: each chunk (previews, then the final images) reaches the client as
the replica sends it. A replica that goes away before its first chunk is replaced by another;
after that the error reaches the client, which has part of a stream that no other replica would
continue (see ``Relay``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from specmesh.v1 import image_pb2, image_pb2_grpc

from .pool import UpstreamPool
from .relay import Relay

IMAGE_SERVICE = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
NOT_CONFIGURED = (
    "this gateway has no image service: start it with --image HOST:PORT "
    "(specmesh serve image; `specmesh up --image` does both)"
)


class ImageFrontDoor(image_pb2_grpc.ImageServiceServicer):
    """Relays every ImageService call to `pool` (None: each call is UNIMPLEMENTED, saying why).
    `upstream_timeout_s` bounds a stream whose client set no deadline."""

    def __init__(self, pool: UpstreamPool | None, upstream_timeout_s: float | None = None) -> None:
        self.relay = Relay(pool, NOT_CONFIGURED, upstream_timeout_s)

    async def Generate(
        self, request: image_pb2.ImageGenerateRequest, context
    ) -> AsyncIterator[image_pb2.ImageGenerateChunk]:
        async for chunk in self.relay.stream("Generate", request, context):
            yield chunk
