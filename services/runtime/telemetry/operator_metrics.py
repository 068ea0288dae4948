"""Gauges and histograms an operator watches on a model server (scraped from the Prometheus
endpoint, or exported over OTLP): open sessions, KV blocks in use / cached / in all, engine
calls waiting or running, and the time calls waited for the engine thread.

Every instrument carries ``specmesh.model`` (the served model's name), so a process serving two
engines (scoring's observer) or a test with several servers tells them apart. The gauges read
the servicer through a weak reference: a closed, collected servicer reports nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from opentelemetry import metrics

SCOPE = "specmesh.runtime.model"

OPEN_SESSIONS = "specmesh.sessions.open"
KV_BLOCKS_USED = "specmesh.kv.blocks.used"
KV_BLOCKS_CACHED = "specmesh.kv.blocks.cached"
KV_BLOCKS_CAPACITY = "specmesh.kv.blocks.capacity"
QUEUE_DEPTH = "specmesh.engine.queue_depth"
QUEUE_WAIT = "specmesh.engine.queue_wait"
MODEL = "specmesh.model"

# queue waits from a free engine thread (~50 us) to a backlog of many forwards (seconds)
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Observed(Protocol):
    """What the gauges read (a ModelServicer)."""

    engine: Any  # .name, .pool (services.core.kv.BlockPool)
    sessions: Any  # len() = open sessions
    engine_calls: int  # calls waiting for or running on the engine thread


class ModelMetrics:
    """The instruments of one model servicer; `waited(seconds)` records a queue wait."""

    def __init__(self, servicer: Observed, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter(SCOPE)
        ref = weakref.ref(servicer)
        self.attributes = {MODEL: servicer.engine.name}

        def gauge(read: Callable[[Observed], int]) -> Callable[[Any], Iterable[metrics.Observation]]:
            def callback(_options: Any) -> Iterable[metrics.Observation]:
                s = ref()
                return [] if s is None else [metrics.Observation(read(s), self.attributes)]

            return callback

        pool = servicer.engine.pool
        meter.create_observable_gauge(
            OPEN_SESSIONS, [gauge(lambda s: len(s.sessions))], unit="{session}", description="Open sessions"
        )
        meter.create_observable_gauge(
            KV_BLOCKS_USED,
            [gauge(lambda s: s.engine.pool.max_blocks - s.engine.pool.free_blocks)],
            unit="{block}",
            description=f"KV blocks referenced by a sequence ({pool.block_size} tokens each)",
        )
        meter.create_observable_gauge(
            KV_BLOCKS_CACHED,
            [gauge(lambda s: s.engine.pool.cached_blocks)],
            unit="{block}",
            description="Sealed KV blocks no sequence references, kept for prefix reuse until evicted",
        )
        meter.create_observable_gauge(
            KV_BLOCKS_CAPACITY,
            [gauge(lambda s: s.engine.pool.max_blocks)],
            unit="{block}",
            description="KV blocks in the preallocated pool",
        )
        meter.create_observable_gauge(
            QUEUE_DEPTH,
            [gauge(lambda s: s.engine_calls)],
            unit="{call}",
            description="Calls waiting for or running on the engine thread",
        )
        self._wait = meter.create_histogram(
            QUEUE_WAIT,
            unit="s",
            description="Time a call waited for the engine thread before it ran",
            explicit_bucket_boundaries_advisory=list(_WAIT_BUCKETS),
        )

    def waited(self, seconds: float) -> None:
        self._wait.record(seconds, self.attributes)
