"""Gauges and histograms an operator watches on a model server (scraped from the Prometheus
endpoint, or exported over OTLP): open sessions, KV blocks in use / cached / resident / in all, engine
calls waiting or running, the time calls waited for the engine thread, and how many requests
each merged forward served (the batch size).

The instruments exist once per process (an OpenTelemetry meter keeps the first instrument of a
name and ignores the callbacks of later ones); every model servicer registers with them and the
gauges report one point per live servicer, told apart by ``specmesh.service`` (target, draft,
scoring) and ``specmesh.model``. Servicers are held weakly: a closed, collected one reports
nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from opentelemetry import metrics

SCOPE = "specmesh.runtime.model"

OPEN_SESSIONS = "specmesh.sessions.open"
KV_BLOCKS_USED = "specmesh.kv.blocks.used"
KV_BLOCKS_CACHED = "specmesh.kv.blocks.cached"
KV_BLOCKS_CAPACITY = "specmesh.kv.blocks.capacity"
KV_BLOCKS_RESIDENT = "specmesh.kv.blocks.resident"
QUEUE_DEPTH = "specmesh.engine.queue_depth"
QUEUE_WAIT = "specmesh.engine.queue_wait"
BATCH_SIZE = "specmesh.engine.batch_size"
MODEL = "specmesh.model"
SERVICE = "specmesh.service"

# queue waits from a free engine thread (~50 us) to a backlog of many forwards (seconds)
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# requests per forward: 1 (no concurrency) up to the batcher's max_batch (32 by default) and past
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Observed(Protocol):
    """What the gauges read (a ModelServicer)."""

    engine: Any  # .name, .pool (services.core.kv.BlockPool)
    sessions: Any  # len() = open sessions
    engine_calls: int  # calls waiting for or running on the engine thread


def attributes(servicer: Observed) -> dict[str, str]:
    service = type(servicer).__name__.removesuffix("Servicer").lower() or "model"
    return {SERVICE: service, MODEL: servicer.engine.name}


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.servicers: weakref.WeakSet[Any] = weakref.WeakSet()

        def gauge(name: str, unit: str, description: str, read: Callable[[Observed], int]) -> None:
            def callback(_options: Any) -> Iterable[metrics.Observation]:
                return [metrics.Observation(read(s), attributes(s)) for s in list(self.servicers)]

            meter.create_observable_gauge(name, [callback], unit=unit, description=description)

        gauge(OPEN_SESSIONS, "{session}", "Open sessions", lambda s: len(s.sessions))
        gauge(
            KV_BLOCKS_USED,
            "{block}",
            "KV blocks referenced by a sequence",
            lambda s: s.engine.pool.max_blocks - s.engine.pool.free_blocks,
        )
        gauge(
            KV_BLOCKS_CACHED,
            "{block}",
            "Sealed KV blocks no sequence references, kept for prefix reuse until evicted",
            lambda s: s.engine.pool.cached_blocks,
        )
        gauge(
            KV_BLOCKS_RESIDENT,
            "{block}",
            "KV blocks ever touched: the pool's resident memory (it stays at max(prefix cache, the "
            "live peak))",
            lambda s: s.engine.pool.resident_blocks,
        )
        gauge(
            KV_BLOCKS_CAPACITY,
            "{block}",
            "KV blocks in the preallocated pool",
            lambda s: s.engine.pool.max_blocks,
        )
        gauge(
            QUEUE_DEPTH,
            "{call}",
            "Calls waiting for or running on the engine thread",
            lambda s: s.engine_calls,
        )
        self.queue_wait = meter.create_histogram(
            QUEUE_WAIT,
            unit="s",
            description="Time a call waited for the engine thread before it ran",
            explicit_bucket_boundaries_advisory=list(_WAIT_BUCKETS),
        )
        self.batch_size = meter.create_histogram(
            BATCH_SIZE,
            unit="{request}",
            description="Requests served by one forward pass (concurrent calls merged by the batcher)",
            explicit_bucket_boundaries_advisory=list(_BATCH_BUCKETS),
        )


_lock = threading.Lock()
_instruments: _Instruments | None = None


def _shared() -> _Instruments:
    """The process's instruments, on the global meter provider (a proxy until setup_telemetry
    installs one, which OpenTelemetry then binds them to)."""
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = _Instruments(metrics.get_meter(SCOPE))
        return _instruments


class ModelMetrics:
    """One servicer's view of the shared instruments: registering it adds it to the gauges;
    `waited(seconds)` records a queue wait, `batched(requests)` a merged forward. It holds no
    reference to the servicer (the engine thread keeps `batched`; the gauges hold it weakly)."""

    def __init__(self, servicer: Observed) -> None:
        self._instruments = _shared()
        self._instruments.servicers.add(servicer)
        self.attributes = attributes(servicer)

    def waited(self, seconds: float) -> None:
        self._instruments.queue_wait.record(seconds, self.attributes)

    def batched(self, requests: int) -> None:
        self._instruments.batch_size.record(requests, self.attributes)
