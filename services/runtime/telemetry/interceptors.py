"""The telemetry interceptor chains for servers and client channels."""

from __future__ import annotations

import grpc.aio
from opentelemetry import metrics
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from .providers import INSTRUMENTATION_NAME, Telemetry, current_telemetry, rpc_duration_histogram
from .server_metrics import RpcMetricsInterceptor
from .server_tracing import TracingServerInterceptor, default_trace_filter


def _resolve(telemetry: Telemetry | None) -> Telemetry | None:
    return telemetry if telemetry is not None else current_telemetry()


def server_interceptors(telemetry: Telemetry | None = None) -> list[grpc.aio.ServerInterceptor]:
    """[tracing, metrics] interceptors for ``grpc.aio.server`` (tracing outermost).

    Uses `telemetry`, else the process Telemetry from :func:`setup_telemetry`, else the global
    OpenTelemetry providers (no-op until someone installs real ones).
    """
    t = _resolve(telemetry)
    if t is not None:
        tracer_provider, histogram = t.tracer_provider, t.rpc_duration
    else:
        tracer_provider = None
        histogram = rpc_duration_histogram(metrics.get_meter(INSTRUMENTATION_NAME))
    return [
        TracingServerInterceptor(tracer_provider, filter_=default_trace_filter()),
        RpcMetricsInterceptor(histogram),
    ]


def client_interceptors(telemetry: Telemetry | None = None) -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry interceptors for ``grpc.aio`` channels: a client span per call and W3C
    trace context injected into the request metadata (not for health checks and reflection,
    like the server side: the gateway's health watches would be traces of their own)."""
    t = _resolve(telemetry)
    provider = t.tracer_provider if t is not None else None
    return list(aio_client_interceptors(tracer_provider=provider, filter_=default_trace_filter()))
