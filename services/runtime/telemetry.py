"""OpenTelemetry setup for specmesh processes: providers, exporters and gRPC interceptors.

Exporters follow the standard variables ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``
(a comma-separated list) with these values:

* ``none`` (the default here: no network unless asked),
* ``otlp`` (OTLP/gRPC; endpoint, headers, timeouts from ``OTEL_EXPORTER_OTLP_*``, read by the
  exporter itself),
* ``console`` (stdout),
* ``memory`` (in-process, for tests: ``Telemetry.memory_spans`` / ``Telemetry.memory_metrics``),
* ``file:PATH`` (traces only: one compact JSON span per line, appended under a lock, so several
  processes can share one file).

``OTEL_SERVICE_NAME`` overrides the service name given in code and ``OTEL_RESOURCE_ATTRIBUTES``
adds resource attributes; ``OTEL_SDK_DISABLED=true`` turns every exporter off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from opentelemetry import metrics, propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ._handlers import as_writer_stream, call_unary, iterate, rewrap, split_method, yields_responses

try:  # advisory lock so several processes can append to one span file
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None

logger = logging.getLogger("specmesh.runtime.telemetry")

INSTRUMENTATION_NAME = "specmesh.runtime"
RPC_DURATION_METRIC = "rpc.server.duration"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE_PREFIX = "grpc.reflection."

_TRACE_KINDS = ("none", "otlp", "console", "memory", "file")
_METRIC_KINDS = ("none", "otlp", "console", "memory")


class TelemetryConfigError(ValueError):
    """An exporter setting is not understood; the message names the variable."""


# ---------------------------------------------------------------------------------------------
# exporters


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one line of compact JSON (``ReadableSpan.to_json``) to a file.

    Each batch is one ``write`` on an ``O_APPEND`` descriptor under a thread lock and an
    advisory ``flock``, so lines from several threads or processes never interleave.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        if not data:
            return SpanExportResult.SUCCESS
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                finally:
                    os.close(fd)  # also releases the flock
        except OSError:
            logger.exception("cannot append spans to %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _otlp_span_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _otlp_metric_reader() -> MetricReader:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(OTLPMetricExporter())


def _parse_exporters(value: str, variable: str, allowed: tuple[str, ...]) -> list[str]:
    """``"otlp,console"`` -> ``["otlp", "console"]``; ``file:PATH`` keeps its path."""
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        kind = item.split(":", 1)[0].lower() if item.lower().startswith("file:") else item.lower()
        if kind not in allowed:
            raise TelemetryConfigError(
                f"{variable}={value!r}: unknown exporter {item!r} (expected one of: "
                + ", ".join("file:PATH" if k == "file" else k for k in allowed)
                + ")"
            )
        if kind == "file":
            path = item.split(":", 1)[1]
            if not path:
                raise TelemetryConfigError(
                    f"{variable}={value!r}: file: needs a path (file:/tmp/spans.jsonl)"
                )
            out.append("file:" + path)
        elif kind != "none":
            out.append(kind)
    return out


# ---------------------------------------------------------------------------------------------
# the per-process object


@dataclass
class Telemetry:
    """Tracer and meter providers of one process (or of one test), plus their gRPC interceptors."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()
    memory_spans: InMemorySpanExporter | None = None
    memory_metrics: InMemoryMetricReader | None = None
    _rpc_duration: Any = field(default=None, repr=False)

    def tracer(self, name: str = INSTRUMENTATION_NAME) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str = INSTRUMENTATION_NAME) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    @property
    def rpc_duration(self) -> metrics.Histogram:
        if self._rpc_duration is None:
            self._rpc_duration = self.meter().create_histogram(
                RPC_DURATION_METRIC, unit="ms", description="Duration of inbound RPCs"
            )
        return self._rpc_duration

    def finished_spans(self) -> list[ReadableSpan]:
        """Spans ended so far (``memory`` exporter only)."""
        if self.memory_spans is None:
            raise RuntimeError("finished_spans() needs traces_exporter='memory'")
        return list(self.memory_spans.get_finished_spans())

    def metric_points(self, name: str) -> list[Any]:
        """Data points of metric `name` collected now (``memory`` reader only)."""
        if self.memory_metrics is None:
            raise RuntimeError("metric_points() needs metrics_exporter='memory'")
        data = self.memory_metrics.get_metrics_data()
        points: list[Any] = []
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return server_interceptors(self)

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return client_interceptors(self)

    def force_flush(self, timeout_millis: int = 5000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_lock = threading.Lock()
_installed: Telemetry | None = None


def current_telemetry() -> Telemetry | None:
    """The Telemetry installed by :func:`setup_telemetry` in this process, if any."""
    return _installed


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def setup_telemetry(
    service_name: str,
    traces_exporter: str | None = None,
    metrics_exporter: str | None = None,
    *,
    install_global: bool = True,
) -> Telemetry:
    """Configure tracing and metrics for `service_name`.

    `traces_exporter` / `metrics_exporter` default to ``OTEL_TRACES_EXPORTER`` /
    ``OTEL_METRICS_EXPORTER`` and then to ``none``. With ``install_global`` (the default) the
    providers become the process-wide OpenTelemetry providers and later calls return the same
    object (idempotent per process). ``install_global=False`` builds an independent Telemetry
    (tests use it with ``"memory"``); call its ``shutdown()`` when done.
    """
    global _installed
    if install_global:
        with _lock:
            if _installed is not None:
                requested = (traces_exporter, metrics_exporter)
                if any(r is not None for r in requested):
                    logger.debug("setup_telemetry called again; keeping the first configuration")
                return _installed
            _installed = _build(service_name, traces_exporter, metrics_exporter, install_global=True)
            trace.set_tracer_provider(_installed.tracer_provider)
            metrics.set_meter_provider(_installed.meter_provider)
            return _installed
    return _build(service_name, traces_exporter, metrics_exporter, install_global=False)


def _build(
    service_name: str, traces_exporter: str | None, metrics_exporter: str | None, *, install_global: bool
) -> Telemetry:
    if traces_exporter is None:
        traces_var, traces_value = "OTEL_TRACES_EXPORTER", os.environ.get("OTEL_TRACES_EXPORTER", "none")
    else:
        traces_var, traces_value = "traces_exporter", traces_exporter
    if metrics_exporter is None:
        metrics_var, metrics_value = "OTEL_METRICS_EXPORTER", os.environ.get("OTEL_METRICS_EXPORTER", "none")
    else:
        metrics_var, metrics_value = "metrics_exporter", metrics_exporter
    trace_kinds = _parse_exporters(traces_value, traces_var, _TRACE_KINDS)
    metric_kinds = _parse_exporters(metrics_value, metrics_var, _METRIC_KINDS)
    if _env_true("OTEL_SDK_DISABLED"):
        trace_kinds, metric_kinds = [], []

    name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
    resource = Resource.create({"service.name": name})

    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=install_global)
    memory_spans = None
    for kind in trace_kinds:
        if kind == "memory":
            memory_spans = InMemorySpanExporter()
            tracer_provider.add_span_processor(SimpleSpanProcessor(memory_spans))
        elif kind.startswith("file:"):
            # synchronous: the line is on disk when the span ends (multi-process tests read it)
            tracer_provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(kind[5:])))
        elif kind == "console":
            tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif kind == "otlp":
            tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))

    readers: list[MetricReader] = []
    memory_metrics = None
    for kind in metric_kinds:
        if kind == "memory":
            memory_metrics = InMemoryMetricReader()
            readers.append(memory_metrics)
        elif kind == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif kind == "otlp":
            readers.append(_otlp_metric_reader())
    meter_provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=install_global)

    return Telemetry(
        service_name=name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        traces_exporters=tuple(trace_kinds),
        metrics_exporters=tuple(metric_kinds),
        memory_spans=memory_spans,
        memory_metrics=memory_metrics,
    )


# ---------------------------------------------------------------------------------------------
# server interceptors


def _default_trace_filter():
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
                        code = _status_code(context, None)
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                        if code in _SERVER_ERROR_CODES:
                            description = f"{code}:{context.details()}"
                            span.set_status(trace.Status(trace.StatusCode.ERROR, description))

            return wrapper

        return rewrap(handler, coro, coro)


# status codes that mark a server span as failed (as opentelemetry-instrumentation-grpc does)
_SERVER_ERROR_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}

_CODES_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _status_code(context, exc: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ends with, as far as the server can tell."""
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, int):
        code = _CODES_BY_VALUE.get(code)
    if code is not None:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records ``rpc.server.duration`` (ms, histogram) per RPC.

    Attributes: ``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``
    (int). Put it outside the exception interceptor so it sees the mapped status.
    """

    def __init__(self, histogram: metrics.Histogram) -> None:
        self._histogram = histogram

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        histogram = self._histogram

        def record(start: float, context, exc: BaseException | None) -> None:
            code = _status_code(context, exc)
            histogram.record(
                (time.perf_counter() - start) * 1000.0,
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "rpc.grpc.status_code": code.value[0],
                },
            )

        def coro(behavior):
            async def wrapper(request, context):
                start = time.perf_counter()
                try:
                    result = await call_unary(behavior, request, context)
                except BaseException as exc:
                    record(start, context, exc)
                    raise
                record(start, context, None)
                return result

            return wrapper

        def gen(behavior):
            async def wrapper(request, context):
                start = time.perf_counter()
                try:
                    async with aclosing(iterate(behavior, request, context)) as responses:
                        async for response in responses:
                            yield response
                except BaseException as exc:
                    record(start, context, exc)
                    raise
                record(start, context, None)

            return wrapper

        return rewrap(handler, coro, gen)


def _resolve(telemetry: Telemetry | None) -> Telemetry | None:
    return telemetry if telemetry is not None else _installed


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
        histogram = metrics.get_meter(INSTRUMENTATION_NAME).create_histogram(
            RPC_DURATION_METRIC, unit="ms", description="Duration of inbound RPCs"
        )
    return [
        TracingServerInterceptor(tracer_provider, filter_=_default_trace_filter()),
        RpcMetricsInterceptor(histogram),
    ]


def client_interceptors(telemetry: Telemetry | None = None) -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry interceptors for ``grpc.aio`` channels: a client span per call and W3C
    trace context injected into the request metadata (not for health checks and reflection,
    like the server side: the gateway's health watches would be traces of their own)."""
    t = _resolve(telemetry)
    provider = t.tracer_provider if t is not None else None
    return list(aio_client_interceptors(tracer_provider=provider, filter_=_default_trace_filter()))
