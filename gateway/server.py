"""Gateway process: pools of target, draft (scoring, image) replicas, the servicers, runtime.serve().

This is the gateway's entry module and stays free of torch (its container image is small):
it imports the runtime, the generated stubs and, from services.core, only the tokenizer,
text streaming, params and errors modules. It needs no model directory: the tokenizer comes
from the target (TargetService.GetTokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from services.runtime.server import RunningServer, aio_channel, run_forever, serve
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import Telemetry
from specmesh.v1 import (
    draft_pb2,
    draft_pb2_grpc,
    gateway_pb2_grpc,
    image_pb2_grpc,
    scoring_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)

from .config import GatewayConfig
from .image import IMAGE_SERVICE, ImageFrontDoor
from .pool import CHANNEL_OPTIONS, RESOLVE_EVERY_S, UpstreamPool, split_addresses
from .scoring import SCORING_SERVICE, ScoringFrontDoor
from .servicer import SERVICE_NAME, GatewayServicer
from .session_store import RedisStore

DEFAULT_PORT = 50050


TARGET_SERVICE = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name
DRAFT_SERVICE = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


@dataclass(frozen=True)
class GatewayOptions:
    # host:port of each target replica: a list, or a comma-separated string; a name that
    # resolves to several addresses (a headless service) stands for all of them
    target: str | Sequence[str]
    draft: str | Sequence[str] | None = None  # the same for draft replicas (None: target policy only)
    tokenizer_dir: str | Path | None = None  # default: fetched from the target (GetTokenizer)
    config: GatewayConfig = GatewayConfig()
    resolve_every_s: float = RESOLVE_EVERY_S  # how often names are re-resolved (0: never)
    # Redis / Valkey holding request records, shared by gateway replicas so that any of them can
    # resume a stream (None: records stay in this process)
    redis_url: str | None = None
    # the same for scoring replicas, relayed as specmesh.v1.ScoringService (None: not served)
    scoring: str | Sequence[str] | None = None
    # the same for image replicas, relayed as specmesh.v1.ImageService (None: not served)
    image: str | Sequence[str] | None = None


class GatewayApp:
    """Builds the servicer inside the serving event loop (channels belong to one loop)."""

    def __init__(
        self, options: GatewayOptions, settings: ServerSettings, telemetry: Telemetry | None = None
    ) -> None:
        self.options = options
        self.settings = settings
        self.telemetry = telemetry
        self.servicer: GatewayServicer | None = None
        self.scoring: UpstreamPool | None = None
        self.image: UpstreamPool | None = None

    def _pool(self, role: str, specs: str | Sequence[str], service: str, stub: type) -> UpstreamPool:
        def connect(address: str) -> tuple[grpc.aio.Channel, object]:
            channel = aio_channel(address, self.settings, telemetry=self.telemetry, options=CHANNEL_OPTIONS)
            return channel, stub(channel)

        return UpstreamPool.connect(
            role,
            split_addresses(specs),
            service_name=service,
            connect=connect,
            resolve_every_s=self.options.resolve_every_s,
        )

    def _count_store_error(self, operation: str) -> None:
        if self.servicer is not None:
            self.servicer.ins.session_store_errors.add(1, {"operation": operation})

    def register(self, server: grpc.aio.Server) -> list[str]:
        o = self.options
        target = self._pool("target", o.target, TARGET_SERVICE, target_pb2_grpc.TargetServiceStub)
        draft = None
        if split_addresses(o.draft):
            draft = self._pool("draft", o.draft, DRAFT_SERVICE, draft_pb2_grpc.DraftServiceStub)
        store = None
        if o.redis_url:
            store = RedisStore(o.redis_url, on_error=self._count_store_error)
        self.servicer = GatewayServicer(
            target,
            draft,
            store=store,
            config=o.config,
            tokenizer_dir=o.tokenizer_dir,
            telemetry=self.telemetry,
        )
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.servicer, server)
        if split_addresses(o.scoring):
            stub = scoring_pb2_grpc.ScoringServiceStub
            self.scoring = self._pool("scoring", o.scoring, SCORING_SERVICE, stub)
        if split_addresses(o.image):
            self.image = self._pool("image", o.image, IMAGE_SERVICE, image_pb2_grpc.ImageServiceStub)
        # served either way: without replicas each call says how to configure them
        timeout = o.config.upstream_timeout_s
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringFrontDoor(self.scoring, timeout), server)
        image_pb2_grpc.add_ImageServiceServicer_to_server(ImageFrontDoor(self.image, timeout), server)
        relayed = [(SCORING_SERVICE, self.scoring), (IMAGE_SERVICE, self.image)]
        return [SERVICE_NAME] + [name for name, pool in relayed if pool is not None]

    async def close(self) -> None:
        """Finish background releases and close the upstream pools (after the server stopped)."""
        if self.servicer is not None:
            await self.servicer.close()
        for pool in (self.scoring, self.image):
            if pool is not None:
                await pool.close()


class GatewayServer:
    """A started gateway; ``stop()`` drains the server, then closes its upstream channels."""

    def __init__(self, running: RunningServer, app: GatewayApp) -> None:
        self.running = running
        self.app = app

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def servicer(self) -> GatewayServicer:
        assert self.app.servicer is not None
        return self.app.servicer

    async def stop(self, grace: float | None = None) -> None:
        await self.running.stop(grace)
        await self.app.close()

    async def __aenter__(self) -> GatewayServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_gateway(
    options: GatewayOptions, settings: ServerSettings, *, telemetry: Telemetry | None = None
) -> GatewayServer:
    """Start a gateway server (returns once it accepts connections)."""
    app = GatewayApp(options, settings, telemetry)
    running = await serve(app.register, settings, telemetry=telemetry)
    return GatewayServer(running, app)


async def run_gateway(
    options: GatewayOptions, settings: ServerSettings, *, telemetry: Telemetry | None = None
) -> None:
    """Serve until SIGTERM / SIGINT, then drain (the process main of `specmesh serve gateway`)."""
    app = GatewayApp(options, settings, telemetry)

    def announce(running: RunningServer) -> None:
        target = ",".join(split_addresses(options.target))
        draft = ",".join(split_addresses(options.draft)) or "none"
        scoring = ",".join(split_addresses(options.scoring)) or "none"
        image = ",".join(split_addresses(options.image)) or "none"
        print(
            f"specmesh gateway serving on {running.address} (target {target}, draft {draft}, "
            f"scoring {scoring}, image {image})",
            flush=True,
        )

    try:
        await run_forever(app.register, settings, telemetry=telemetry, on_start=announce)
    finally:
        await app.close()
