"""The per-process Telemetry: tracer and meter providers built from the exporter settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .config import exporter_kinds, service_name
from .exporters import add_span_exporters, metric_readers
from .prometheus import PrometheusEndpoint, start_prometheus

logger = logging.getLogger("specmesh.runtime.telemetry")

INSTRUMENTATION_NAME = "specmesh.runtime"
RPC_DURATION_METRIC = "rpc.server.duration"


def rpc_duration_histogram(meter: metrics.Meter) -> metrics.Histogram:
    return meter.create_histogram(RPC_DURATION_METRIC, unit="ms", description="Duration of inbound RPCs")


@dataclass
class Telemetry:
    """Tracer and meter providers of one process (or of one test)."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()
    memory_spans: InMemorySpanExporter | None = None
    memory_metrics: InMemoryMetricReader | None = None
    prometheus: PrometheusEndpoint | None = None  # the scrape endpoint, when asked for
    _rpc_duration: Any = field(default=None, repr=False)

    def tracer(self, name: str = INSTRUMENTATION_NAME) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str = INSTRUMENTATION_NAME) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    @property
    def rpc_duration(self) -> metrics.Histogram:
        if self._rpc_duration is None:
            self._rpc_duration = rpc_duration_histogram(self.meter())
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

    def force_flush(self, timeout_millis: int = 5000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()


_lock = threading.Lock()
_installed: Telemetry | None = None


def current_telemetry() -> Telemetry | None:
    """The Telemetry installed by :func:`setup_telemetry` in this process, if any."""
    return _installed


def setup_telemetry(
    service_name: str,
    traces_exporter: str | None = None,
    metrics_exporter: str | None = None,
    *,
    install_global: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> Telemetry:
    """Configure tracing and metrics for `service_name`.

    `traces_exporter` / `metrics_exporter` default to ``OTEL_TRACES_EXPORTER`` /
    ``OTEL_METRICS_EXPORTER`` and then to ``none``. With ``install_global`` (the default) the
    providers become the process-wide OpenTelemetry providers and later calls return the same
    object (idempotent per process). ``install_global=False`` builds an independent Telemetry
    (tests use it with ``"memory"``); call its ``shutdown()`` when done. `metrics_port` (0 = a
    free one) adds a Prometheus scrape endpoint on `metrics_host` (``Telemetry.prometheus``).
    """
    global _installed
    if install_global:
        with _lock:
            if _installed is not None:
                requested = (traces_exporter, metrics_exporter)
                if any(r is not None for r in requested):
                    logger.debug("setup_telemetry called again; keeping the first configuration")
                if metrics_port is not None and _installed.prometheus is None:
                    logger.warning(
                        "metrics_port %s ignored: this process's telemetry was set up without a "
                        "Prometheus endpoint (set it in the first setup_telemetry call)",
                        metrics_port,
                    )
                return _installed
            _installed = _build(
                service_name, traces_exporter, metrics_exporter, True, metrics_port, metrics_host
            )
            trace.set_tracer_provider(_installed.tracer_provider)
            metrics.set_meter_provider(_installed.meter_provider)
            return _installed
    return _build(service_name, traces_exporter, metrics_exporter, False, metrics_port, metrics_host)


def _build(
    default_name: str,
    traces_exporter: str | None,
    metrics_exporter: str | None,
    install_global: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> Telemetry:
    trace_kinds, metric_kinds = exporter_kinds(traces_exporter, metrics_exporter)
    name = service_name(default_name)
    resource = Resource.create({"service.name": name})
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=install_global)
    memory_spans = add_span_exporters(tracer_provider, trace_kinds)
    readers, memory_metrics = metric_readers(metric_kinds)
    prometheus = start_prometheus(metrics_host, metrics_port) if metrics_port is not None else None
    if prometheus is not None:
        readers.append(prometheus.reader)
    meter_provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=install_global)
    return Telemetry(
        service_name=name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        traces_exporters=tuple(trace_kinds),
        metrics_exporters=tuple(metric_kinds),
        memory_spans=memory_spans,
        memory_metrics=memory_metrics,
        prometheus=prometheus,
    )
