"""Where spans and metrics go: one span processor or metric reader per configured exporter kind."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .config import TelemetryConfigError

try:  # advisory lock so several processes can append to one span file
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None

logger = logging.getLogger("specmesh.runtime.telemetry")


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


class RateLimitedSpanExporter(SpanExporter):
    """Passes at most `per_second` spans a second to `inner` and drops the rest, saying how many
    it dropped once a second. The console exporter prints every span as a dozen lines of JSON:
    a local stack under load printed tens of thousands of lines a minute, burying its logs."""

    def __init__(self, inner: SpanExporter, per_second: int, clock=time.monotonic) -> None:
        self.inner, self.per_second, self._clock = inner, per_second, clock
        self._window, self._passed, self._dropped = clock(), 0, 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            now = self._clock()
            if now - self._window >= 1.0:
                if self._dropped:
                    logger.warning(
                        "console span exporter: dropped %d spans over %d a second "
                        "(SPECMESH_CONSOLE_SPANS_PER_SECOND)",
                        self._dropped,
                        self.per_second,
                    )
                self._window, self._passed, self._dropped = now, 0, 0
            room = max(self.per_second - self._passed, 0)
            keep = list(spans[:room])
            self._passed += len(keep)
            self._dropped += len(spans) - len(keep)
        return self.inner.export(keep) if keep else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def console_spans_per_second() -> int:
    """``SPECMESH_CONSOLE_SPANS_PER_SECOND`` (default 20; 0 = no limit)."""
    raw = os.environ.get("SPECMESH_CONSOLE_SPANS_PER_SECOND", "").strip() or "20"
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise TelemetryConfigError(f"SPECMESH_CONSOLE_SPANS_PER_SECOND={raw!r}: expected an integer >= 0")
    return value


def _otlp_span_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _otlp_metric_reader() -> MetricReader:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(OTLPMetricExporter())


def add_span_exporters(provider: TracerProvider, kinds: Sequence[str]) -> InMemorySpanExporter | None:
    """Attach a span processor per kind (from config.exporter_kinds); returns the ``memory`` exporter."""
    memory_spans = None
    for kind in kinds:
        if kind == "memory":
            memory_spans = InMemorySpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(memory_spans))
        elif kind.startswith("file:"):
            # synchronous: the line is on disk when the span ends (multi-process tests read it)
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(kind[5:])))
        elif kind == "console":
            exporter: SpanExporter = ConsoleSpanExporter()
            limit = console_spans_per_second()
            if limit:
                exporter = RateLimitedSpanExporter(exporter, limit)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        elif kind == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
    return memory_spans


def metric_readers(kinds: Sequence[str]) -> tuple[list[MetricReader], InMemoryMetricReader | None]:
    """A metric reader per kind (from config.exporter_kinds), and the ``memory`` one."""
    readers: list[MetricReader] = []
    memory_metrics = None
    for kind in kinds:
        if kind == "memory":
            memory_metrics = InMemoryMetricReader()
            readers.append(memory_metrics)
        elif kind == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif kind == "otlp":
            readers.append(_otlp_metric_reader())
    return readers, memory_metrics
