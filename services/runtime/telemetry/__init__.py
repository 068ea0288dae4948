"""OpenTelemetry for specmesh processes: providers, exporters and gRPC interceptors.

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

Modules: ``config`` (the settings), ``exporters``, ``providers`` (the per-process
:class:`Telemetry`), ``server_tracing`` / ``server_metrics`` (the server interceptors),
``status`` (the status an RPC ends with) and ``interceptors`` (the server and client chains).
"""

from .config import TelemetryConfigError
from .interceptors import client_interceptors, server_interceptors
from .providers import RPC_DURATION_METRIC, Telemetry, current_telemetry, setup_telemetry

__all__ = [
    "RPC_DURATION_METRIC",
    "Telemetry",
    "TelemetryConfigError",
    "client_interceptors",
    "current_telemetry",
    "server_interceptors",
    "setup_telemetry",
]
