"""Which exporters a process uses: the ``OTEL_*`` variables (or explicit values), parsed and checked."""

from __future__ import annotations

import os

TRACE_KINDS = ("none", "otlp", "console", "memory", "file")
METRIC_KINDS = ("none", "otlp", "console", "memory")


class TelemetryConfigError(ValueError):
    """An exporter setting is not understood; the message names the variable."""


def parse_exporters(value: str, variable: str, allowed: tuple[str, ...]) -> list[str]:
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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def exporter_kinds(traces_exporter: str | None, metrics_exporter: str | None) -> tuple[list[str], list[str]]:
    """(trace kinds, metric kinds); a None argument falls back to ``OTEL_TRACES_EXPORTER`` /
    ``OTEL_METRICS_EXPORTER`` and then to ``none``; ``OTEL_SDK_DISABLED=true`` empties both."""
    if traces_exporter is None:
        traces_var, traces_value = "OTEL_TRACES_EXPORTER", os.environ.get("OTEL_TRACES_EXPORTER", "none")
    else:
        traces_var, traces_value = "traces_exporter", traces_exporter
    if metrics_exporter is None:
        metrics_var, metrics_value = "OTEL_METRICS_EXPORTER", os.environ.get("OTEL_METRICS_EXPORTER", "none")
    else:
        metrics_var, metrics_value = "metrics_exporter", metrics_exporter
    trace_kinds = parse_exporters(traces_value, traces_var, TRACE_KINDS)
    metric_kinds = parse_exporters(metrics_value, metrics_var, METRIC_KINDS)
    if _env_true("OTEL_SDK_DISABLED"):
        return [], []
    return trace_kinds, metric_kinds


def service_name(default: str) -> str:
    """``OTEL_SERVICE_NAME`` when set, else the name given in code."""
    return os.environ.get("OTEL_SERVICE_NAME", "").strip() or default
