"""Session stores: records through memory and through a real Valkey server, and what the Redis
store does while the server is gone (saving fails soft and is counted, loading says UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.budget import Budget
from gateway.record import RequestRecord
from gateway.requests import Plan
from gateway.session_store import KEY_PREFIX, MemoryStore, RedisStore
from services.core.errors import Unavailable
from services.runtime.protocol import generation_params
from specmesh.v1 import common_pb2, gateway_pb2


def _record(session_id: str = "s1", tokens=(7, 8, 9)) -> RequestRecord:
    sampling = common_pb2.SamplingParams(max_new_tokens=20, temperature=0.7, seed=11)
    plan = Plan(
        policy=gateway_pb2.POLICY_SPECULATIVE,
        model="m",
        prompt_ids=(1, 2, 3),
        operation="text_completion",
        params=generation_params(sampling),
        sampling=sampling,
        strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
        budget=Budget(max_nodes=4, max_depth=4),
    )
    record = RequestRecord(session_id, plan, max_context=256, tokens=list(tokens), rounds=2)
    record.upstream("target").bind("127.0.0.1:1")
    return record


def test_memory_store_roundtrip_ttl_and_bound() -> None:
    async def scenario():
        store = MemoryStore(max_records=2)
        await store.save(_record("a"))
        loaded = await store.load("a")
        loaded.tokens.append(99)  # a loaded record is a copy, not the saved object
        again = await store.load("a")
        await store.save(_record("b"))
        await store.save(_record("c"))  # evicts "a", the least recently saved
        evicted = await store.load("a")
        expired = MemoryStore(ttl_s=-1)
        await expired.save(_record("d"))
        return loaded, again, evicted, await store.load("c"), await expired.load("d")

    loaded, again, evicted, kept, expired = asyncio.run(scenario())
    assert again == _record("a") and loaded != again
    assert evicted is None and kept == _record("c") and expired is None


def test_redis_store_roundtrip(redis_server) -> None:
    async def scenario():
        store = RedisStore(redis_server.url, ttl_s=30)
        await store.save(_record("r1"))
        loaded = await store.load("r1")
        missing = await store.load("nope")
        ttl = await store._client.ttl(KEY_PREFIX + "r1")
        await store.close()
        return loaded, missing, ttl

    loaded, missing, ttl = asyncio.run(scenario())
    assert loaded == _record("r1") and missing is None
    assert 0 < ttl <= 30


def test_redis_store_while_the_server_is_gone(redis_server, caplog) -> None:
    errors: list[str] = []

    async def scenario():
        store = RedisStore(redis_server.url, ttl_s=30, timeout_s=0.5, on_error=errors.append)
        await store.save(_record("before"))
        redis_server.kill()
        await store.save(_record("during"))  # no exception: the stream goes on
        await store.save(_record("during-2"))
        with pytest.raises(Unavailable, match="unreachable"):
            await store.load("before")
        redis_server.start()  # same port, empty (no persistence)
        await store.save(_record("after"))
        after = await store.load("after")
        await store.close()
        return after

    with caplog.at_level(logging.WARNING, logger="specmesh.gateway.sessions"):
        after = asyncio.run(scenario())
    assert errors == ["save", "save", "load"]  # counted every time ...
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # ... logged once per outage
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert after == _record("after")  # publishing resumed when the server came back
