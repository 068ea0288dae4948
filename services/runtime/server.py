"""`serve()`: the one way a specmesh gRPC server is built, started and drained.

Every server gets, in this order of interceptors: OpenTelemetry tracing, the
``rpc.server.duration`` histogram, the exception mapper, then the caller's interceptors;
message size limits and keepalive settings from :class:`ServerSettings`; ``grpc.health.v1``
(every registered service and the overall ``""`` SERVING); server reflection (v1 and v1alpha);
a Prometheus scrape endpoint when ``metrics_port`` is set; and a graceful
stop that reports NOT_SERVING first, then lets in-flight RPCs finish within the grace period.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from . import security
from .errors import ExceptionInterceptor
from .settings import ServerSettings
from .telemetry import Telemetry, client_interceptors, server_interceptors, setup_telemetry

logger = logging.getLogger("specmesh.runtime.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_SERVICE_NAME = _health.SERVICE_NAME
REFLECTION_SERVICE_NAME = reflection.SERVICE_NAME
# grpcio-reflection ships only v1alpha; grpc.reflection.v1 has the same messages under another
# proto package (identical on the wire), so the v1alpha servicer answers on the v1 name as well.
REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"

RegisterFn = Callable[[grpc.aio.Server], "Iterable[str] | None | Awaitable[Iterable[str] | None]"]
OnStartFn = Callable[["RunningServer"], "Awaitable[None] | None"]


class ServerStartError(RuntimeError):
    """The server could not bind or start."""


class DrainingHealthServicer(_health_aio.HealthServicer):
    """The stock grpc.aio health servicer, except that ``Watch`` streams end on shutdown.

    The stock ``Watch`` never returns, so every open watch (a load balancer, a gateway
    replica pool) would hold ``server.stop(grace)`` for the whole grace period. Here a watch
    sends NOT_SERVING and then completes with OK once :meth:`enter_graceful_shutdown` is called.
    ``Check`` and ``set`` are the stock ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": SERVING}
        self._draining = False
        self._version = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _bump(self) -> None:
        cond = self._condition()
        async with cond:
            self._version += 1
            cond.notify_all()

    def status(self, service: str = "") -> int | None:
        """The status `service` reports now (None: unknown service)."""
        return self._statuses.get(service)

    @property
    def draining(self) -> bool:
        return self._draining

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._draining:
            self._statuses[service] = status
            await self._bump()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        if self._draining:
            return
        self._draining = True
        for service in self._statuses:
            self._statuses[service] = NOT_SERVING
        await self._bump()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:  # noqa: N802
        cond = self._condition()
        seen_version = -1
        last_sent = None
        while True:
            async with cond:
                await cond.wait_for(lambda seen=seen_version: self._version != seen)
                seen_version = self._version
                status = self._statuses.get(request.service, SERVICE_UNKNOWN)
                draining = self._draining
            if status != last_sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last_sent = status
            if draining:
                return


def dial_address(host: str, port: int) -> str:
    """An address a local client can dial for a server bound to `host`:`port`."""
    host = host.strip()
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    return _join(host, port)


def _join(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class RunningServer:
    """A started server. ``async with`` stops it (gracefully) on exit."""

    server: grpc.aio.Server
    settings: ServerSettings
    port: int
    health: DrainingHealthServicer
    service_names: tuple[str, ...]
    telemetry: Telemetry | None = None
    _stop_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` a client on this machine can dial (0.0.0.0 becomes 127.0.0.1)."""
        return dial_address(self.settings.host, self.port)

    @property
    def bind_address(self) -> str:
        return _join(self.settings.host, self.port)

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    async def set_serving(self, serving: bool, services: Iterable[str] | None = None) -> None:
        """Report `services` (default: all registered ones and ``""``) as SERVING or NOT_SERVING."""
        names = ("", *self.service_names) if services is None else tuple(services)
        for name in names:
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, wait ``drain_delay_seconds``, then ``server.stop(grace)``.

        New RPCs are refused once the listener closes; RPCs in flight get `grace` seconds
        (default ``settings.grace_seconds``) to finish before they are cancelled. Concurrent
        calls share one drain.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._drain(grace))
        await asyncio.shield(self._stop_task)

    async def _drain(self, grace: float | None) -> None:
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_seconds > 0:
            await asyncio.sleep(self.settings.drain_delay_seconds)
        await self.server.stop(grace)

    async def wait(self) -> None:
        """Return when the server has terminated."""
        await self.server.wait_for_termination()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()


def _enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Server reflection as ``grpc.reflection.v1alpha`` and ``grpc.reflection.v1`` (newer clients,
    grpcurl among them, ask v1 first). The list it answers names v1alpha only: this process has
    no descriptor of the v1 proto to describe it with."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handlers = {"ServerReflectionInfo": v1}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE_NAME, handlers),)
    )


def _port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound right now (None: it can, or port 0), found with a plain
    socket so that a taken port is one clear line instead of gRPC's own log of the failure."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


async def serve(
    register: RegisterFn,
    settings: ServerSettings | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    telemetry: Telemetry | None = None,
    on_start: OnStartFn | None = None,
) -> RunningServer:
    """Build, bind and start a grpc.aio server; return once it accepts connections.

    `register(server)` adds the servicers (``add_XServicer_to_server(...)``) and returns their
    full service names (``"specmesh.v1.Draft"``), which get health entries and reflection; it
    may be async. `settings` defaults to ``ServerSettings.from_env()``; `telemetry` to
    ``setup_telemetry(settings.service_name)`` (exporters from ``OTEL_*``, default none; a
    Prometheus endpoint when ``settings.metrics_port`` is set).
    `interceptors` run inside the runtime's own (after tracing, metrics and exception mapping).
    `on_start(running)` (sync or async) runs after the server started.
    """
    settings = settings if settings is not None else ServerSettings.from_env()
    if telemetry is None:
        telemetry = setup_telemetry(
            settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
        )
    try:
        credentials = security.server_credentials(settings)
    except security.SecurityError as exc:
        raise ServerStartError(str(exc)) from None
    # auth after tracing (refused calls are traced), before the servicers
    chain = [
        *server_interceptors(telemetry),
        *security.server_interceptors(settings),
        ExceptionInterceptor(),
        *interceptors,
    ]
    server = grpc.aio.server(
        interceptors=chain,
        options=settings.server_options(),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    registered = register(server)
    if inspect.isawaitable(registered):
        registered = await registered
    names = tuple(registered or ())
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise TypeError(
                f"register() must return full service names like 'specmesh.v1.Draft', got {name!r}"
            )

    health = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *names):
        await health.set(name, SERVING)
    _enable_reflection([*names, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME], server)

    bind = _join(settings.host, settings.port)
    taken = _port_taken(settings.host, settings.port)
    if taken:
        raise ServerStartError(f"cannot bind {bind}: {taken} (is another server on that port? pick another)")
    try:
        if credentials is None:
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, credentials)
    except RuntimeError as exc:
        raise ServerStartError(
            f"cannot bind {bind}: {exc} (is the port in use, or the host not local?)"
        ) from exc
    if port == 0:  # older grpcio reports a failed bind this way
        raise ServerStartError(f"cannot bind {bind} (is the port in use, or the host not local?)")
    await server.start()
    running = RunningServer(server, settings, port, health, names, telemetry)
    logger.info(
        "%s serving %s on %s",
        settings.service_name,
        ", ".join(names) or "(no services)",
        running.bind_address,
    )
    if on_start is not None:
        try:
            result = on_start(running)
            if inspect.isawaitable(result):
                await result
        except BaseException:
            await server.stop(0)
            raise
    return running


async def run_forever(
    register: RegisterFn,
    settings: ServerSettings | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    telemetry: Telemetry | None = None,
    on_start: OnStartFn | None = None,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until SIGTERM/SIGINT (or until the server stops), then drain and return.

    The first signal starts a graceful stop (NOT_SERVING, drain delay, grace period); a second
    one cancels the RPCs still running. Telemetry is flushed before returning.
    ``asyncio.run(run_forever(register, settings))`` is a complete server main.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    state: dict[str, Any] = {"signals": 0, "running": None}

    def on_signal(signum: int) -> None:
        state["signals"] += 1
        name = signal.Signals(signum).name
        running = state["running"]
        if state["signals"] == 1:
            logger.info("%s received: draining", name)
            stop_requested.set()
        elif running is not None:
            logger.warning("%s received again: cancelling in-flight RPCs", name)
            loop.create_task(running.server.stop(0))

    installed = []
    for signum in signals:
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            logger.debug("cannot install a handler for signal %s", signum)
    running: RunningServer | None = None
    try:
        running = await serve(
            register, settings, interceptors=interceptors, telemetry=telemetry, on_start=on_start
        )
        state["running"] = running
        waiter = asyncio.ensure_future(running.wait())
        stopper = asyncio.ensure_future(stop_requested.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            await running.stop()
            await waiter
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        if running is not None and running.telemetry is not None:
            running.telemetry.force_flush()


def aio_channel(
    address: str,
    settings: ServerSettings | None = None,
    *,
    telemetry: Telemetry | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` matching a server with `settings`.

    Same message size limit, keepalive pings the server accepts, TLS when ``tls_ca_file`` is
    set (mTLS with this process's own certificate), the ``upstream_auth_token`` on every call,
    OpenTelemetry client interceptors (client spans + trace context in metadata), then
    `interceptors`. `options` override individual channel arguments. Create it inside the event
    loop that uses it.
    """
    settings = settings if settings is not None else ServerSettings.from_env()
    merged = dict(settings.channel_options())
    merged.update(dict(options))
    chain = [*client_interceptors(telemetry), *security.client_interceptors(settings), *interceptors]
    credentials = security.channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(merged.items()), interceptors=chain)
    return grpc.aio.secure_channel(address, credentials, options=list(merged.items()), interceptors=chain)
