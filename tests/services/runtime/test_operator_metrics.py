"""Operator gauges (services/runtime/telemetry/operator_metrics.py) over real model servicers on
tiny engines: one point per live servicer, values that follow sessions and KV use, and nothing
from a servicer that is gone."""

from __future__ import annotations

import asyncio
import gc

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tiny_models import tiny_config

from services.core.engine import Engine
from services.runtime.model_servicer import ModelServicer
from services.runtime.telemetry import operator_metrics as om
from services.runtime.worker import Clock
from specmesh.v1 import common_pb2


class TargetServicer(ModelServicer):  # named as a service's servicer: specmesh.service=target
    pass


class DraftServicer(ModelServicer):
    pass


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    value = p.count if value is None else value
                    out.setdefault(metric.name, {})[tuple(sorted(p.attributes.items()))] = value
    return out


def open_session(servicer: ModelServicer, ref: common_pb2.SessionRef) -> None:
    servicer._append(servicer._open_session(ref))


def test_one_point_per_servicer_following_sessions_and_kv() -> None:
    reader = InMemoryMetricReader()
    instruments = om._Instruments(MeterProvider(metric_readers=[reader]).get_meter("t"))
    target = TargetServicer(Engine.from_config(tiny_config(), block_size=4), max_sessions=4)
    draft = DraftServicer(Engine.from_config(tiny_config(), block_size=4), max_sessions=4)
    instruments.servicers.add(target)
    instruments.servicers.add(draft)
    key_t = tuple(sorted(om.attributes(target).items()))
    key_d = tuple(sorted(om.attributes(draft).items()))
    assert dict(key_t)[om.SERVICE] == "target" and dict(key_d)[om.SERVICE] == "draft"

    ref = common_pb2.SessionRef(session_id="a", new_tokens=list(range(3, 12)), expected_length=9)

    asyncio.run(target._on_engine(Clock(), open_session, target, ref))
    seen = points(reader)
    assert seen[om.OPEN_SESSIONS] == {key_t: 1, key_d: 0}
    assert seen[om.KV_BLOCKS_USED][key_t] >= 2 and seen[om.KV_BLOCKS_USED][key_d] == 0  # 9 tokens, 4 a block
    assert seen[om.KV_BLOCKS_CAPACITY][key_t] == target.engine.pool.max_blocks
    assert seen[om.QUEUE_DEPTH] == {key_t: 0, key_d: 0}  # the call has finished

    target.close()
    del target
    gc.collect()
    assert points(reader)[om.OPEN_SESSIONS] == {key_d: 0}  # a collected servicer reports nothing
    draft.close()


def test_batch_sizes_are_recorded_per_merged_forward(monkeypatch) -> None:
    reader = InMemoryMetricReader()
    monkeypatch.setattr(
        om, "_instruments", om._Instruments(MeterProvider(metric_readers=[reader]).get_meter("t"))
    )
    target = TargetServicer(Engine.from_config(tiny_config(), block_size=4), max_sessions=8)
    refs = [
        common_pb2.SessionRef(session_id=f"s{i}", new_tokens=list(range(3, 8 + i)), expected_length=5 + i)
        for i in range(4)
    ]

    async def concurrently() -> None:
        await asyncio.gather(
            *(target._on_engine(Clock(), open_session, target, r, key=r.session_id) for r in refs)
        )

    try:
        asyncio.run(concurrently())
        sizes = list(target._worker.batcher.batch_sizes)
    finally:
        target.close()
    (point,) = [
        p
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == om.BATCH_SIZE
        for p in m.data.data_points
    ]
    # one point per forward, its value the requests merged into it (however the four calls met)
    assert (point.count, point.sum) == (len(sizes), sum(sizes)) and sum(sizes) == len(refs)
    assert dict(point.attributes)[om.SERVICE] == "target"
