"""A Prometheus scrape endpoint next to OTLP: the OpenTelemetry Prometheus metric reader on a
registry of its own, served over HTTP (``GET /metrics``) by prometheus_client.

Every metric a process records through its meter provider (``rpc.server.duration``, the
gateway's GenAI histograms, the operator gauges of ``operator_metrics``) appears there under
Prometheus naming: dots become underscores and the unit is appended
(``rpc_server_duration_milliseconds_count``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server

from .config import TelemetryConfigError

logger = logging.getLogger("specmesh.runtime.telemetry")


@dataclass
class PrometheusEndpoint:
    """A running scrape endpoint; `close()` stops its HTTP server."""

    host: str
    port: int
    reader: PrometheusMetricReader
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_prometheus(host: str, port: int) -> PrometheusEndpoint:
    """Bind `host`:`port` (0 = a free port) and serve the reader's metrics there. A taken port
    is a TelemetryConfigError (one line for the CLI), not a traceback."""
    registry = CollectorRegistry(auto_describe=True)  # per endpoint: several servers in one process
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise TelemetryConfigError(
            f"metrics_port: cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    endpoint = PrometheusEndpoint(host, server.server_port, reader, server, thread)
    logger.info("Prometheus metrics on %s", endpoint.url)
    return endpoint
