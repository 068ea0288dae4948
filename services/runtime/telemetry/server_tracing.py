"""Server spans: the OpenTelemetry gRPC server interceptor, with response streams traced here."""

from __future__ import annotations

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from .._handlers import as_writer_stream, call_unary, rewrap, split_method, yields_responses
from .providers import INSTRUMENTATION_NAME
from .status import status_code

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE_PREFIX = "grpc.reflection."

# status codes that mark a server span as failed (as opentelemetry-instrumentation-grpc does)
_SERVER_ERROR_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def default_trace_filter():
    """Do not trace health checks and reflection (probes would flood the traces)."""
    return filters.negate(
        filters.any_of(
            filters.service_name(HEALTH_SERVICE),
            filters.service_prefix(REFLECTION_SERVICE_PREFIX),
        )
    )


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """The OpenTelemetry aio server interceptor, with response streams traced here instead.

    opentelemetry-instrumentation-grpc wraps every response-streaming handler with
    ``async for ... in behavior(...)``, which fails with TypeError for handlers that stream by
    ``await context.write(...)`` (grpc.aio's other streaming style, used by the stock
    health ``Watch``), and leaves a yielding stream that the client cancelled to be closed
    from another task, where its span's context token cannot be reset. So yielding streams are
    turned into ``context.write`` ones that close themselves (_handlers.as_writer), and every
    response stream gets its server span from this class; the rest go through the
    OpenTelemetry interceptor unchanged. Being outermost, it must stay first in the chain.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None, filter_=None) -> None:
        self._filter = filter_
        self._otel = aio_server_interceptor(tracer_provider=tracer_provider, filter_=filter_)
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if yields_responses(handler):  # outermost, so the whole stream unwinds in the RPC's task
            handler = as_writer_stream(handler)
        if self._filter is not None and not self._filter(handler_call_details):
            return handler
        if handler.response_streaming:
            return self._trace_writer_stream(handler, handler_call_details)

        async def resolved(_details):
            return handler

        return await self._otel.intercept_service(resolved, handler_call_details)

    def _trace_writer_stream(self, handler, handler_call_details):
        service, method = split_method(handler_call_details.method)
        tracer = self._tracer

        def coro(behavior):
            async def wrapper(request, context):
                carrier = {md.key: md.value for md in context.invocation_metadata() or ()}
                attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
                with tracer.start_as_current_span(
                    handler_call_details.method,
                    context=propagate.extract(carrier),
                    kind=trace.SpanKind.SERVER,
                    attributes=attributes,
                    record_exception=True,
                    set_status_on_exception=False,
                ) as span:
                    try:
                        return await call_unary(behavior, request, context)
                    finally:
                        code = status_code(context, None)
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                        if code in _SERVER_ERROR_CODES:
                            description = f"{code}:{context.details()}"
                            span.set_status(trace.Status(trace.StatusCode.ERROR, description))

            return wrapper

        return rewrap(handler, coro, coro)
