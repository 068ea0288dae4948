"""The Redis KV adapter against a real Valkey (the `redis_server` fixture), with tiny random
engines: write-behind publishing, longest-prefix restores that stop at the first miss, TTLs,
the bounded queue, password URLs, and degraded mode (Redis killed, then back)."""

from __future__ import annotations

import logging
import random
import time

import pytest
import redis
import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.runtime import kv_store
from services.runtime.kv_store import KVStore, redis_key
from services.runtime.settings import KVStoreSettings
from services.runtime.telemetry import setup_telemetry

BS = 4


def engine(digest: str = "d0") -> Engine:
    return Engine.from_config(tiny_config(), seed=1, block_size=BS, max_kv_tokens=64 * BS, digest=digest)


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 97) for _ in range(n)]


@pytest.fixture
def telemetry():
    t = setup_telemetry("kv-store-test", "none", "memory", install_global=False)
    yield t
    t.shutdown()


def total(telemetry, name: str, **attrs) -> int:
    points = telemetry.metric_points(name)
    return sum(p.value for p in points if all(p.attributes.get(k) == v for k, v in attrs.items()))


def store(url: str, telemetry=None, **kw) -> KVStore:
    return KVStore(url, meter=telemetry.meter("t") if telemetry else None, **kw)


def test_a_second_engine_restores_what_the_first_published(redis_server, telemetry) -> None:
    a, b = engine(), engine()
    sa, sb = store(redis_server.url, telemetry), store(redis_server.url, telemetry)
    sa.attach(a)
    sb.attach(b)
    prompt = ids(5 * BS + 3, seed=1)
    logits_a = a.prefill(a.new_sequence(), prompt)
    assert sa.flush()
    assert sa.stats.published == 5 and total(telemetry, kv_store.BLOCKS, operation="publish") == 5
    client = redis.Redis.from_url(redis_server.url)
    keys = a.new_sequence().continuation_keys(prompt, keep=0)
    assert all(0 < client.ttl(redis_key(k)) <= 3600 for k in keys)  # a TTL on every key

    logits_b, cached = b.prefill_cached(b.new_sequence(), prompt)
    assert cached == 5 * BS and sb.stats.restored == 5
    assert torch.allclose(logits_b, logits_a, atol=1e-5)
    assert sb.flush() and sb.stats.published == 0  # restored blocks are not published again
    # a prefix no one published: a miss (its own blocks are then published, write-behind)
    b.prefill_cached(b.new_sequence(), ids(3 * BS + 1, seed=9))
    assert (sb.stats.lookups, sb.stats.hits) == (2, 1)
    assert (
        total(telemetry, kv_store.LOOKUPS, result="hit")
        == total(telemetry, kv_store.LOOKUPS, result="miss")
        == 1
    )
    for s in (sa, sb):
        s.close()


def test_lookups_stop_at_the_first_miss_and_refuse_foreign_values(redis_server) -> None:
    a, b = engine(), engine()
    sa, sb = store(redis_server.url, read_chunk=2), store(redis_server.url, read_chunk=2)
    sa.attach(a)
    sb.attach(b)
    prompt = ids(6 * BS + 1, seed=2)
    a.prefill(a.new_sequence(), prompt)
    sa.flush()
    keys = a.new_sequence().continuation_keys(prompt)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(redis_key(keys[3]))  # evicted from the middle of the prefix
    assert b.adopt_cached(b.new_sequence(), prompt) == 3 * BS
    # a value of another model under a key b asks for: refused by the format check, a miss
    client.set(redis_key(keys[0]), client.get(redis_key(keys[1])))
    c = engine()
    sc = store(redis_server.url)
    sc.attach(c)
    assert c.adopt_cached(c.new_sequence(), prompt) == 0 and sc.stats.invalid == 1
    for s in (sa, sb, sc):
        s.close()


def test_other_weights_find_nothing(redis_server) -> None:
    a, other = engine("d0"), engine("d1")
    sa, so = store(redis_server.url), store(redis_server.url)
    sa.attach(a)
    so.attach(other)
    prompt = ids(3 * BS + 1, seed=3)
    a.prefill(a.new_sequence(), prompt)
    sa.flush()
    assert other.adopt_cached(other.new_sequence(), prompt) == 0
    sa.close()
    so.close()


def test_bf16_storage_restores_bf16_rounded_kv(redis_server) -> None:
    a, b = engine(), engine()
    sa, sb = store(redis_server.url, storage="bfloat16"), store(redis_server.url)
    sa.attach(a)
    sb.attach(b)
    prompt = ids(2 * BS + 1, seed=4)
    seq = a.new_sequence()
    a.prefill(seq, prompt)
    sa.flush()
    payload = 2 * 2 * a.pool.k[:, 0].numel() * 2  # two blocks, k and v, two bytes a value
    assert payload < sa.stats.bytes_written < payload + 2 * 256  # plus two small headers
    restored = b.new_sequence()
    assert b.adopt_cached(restored, prompt) == 2 * BS
    got = b.pool.k[:, restored.blocks]
    want = a.pool.k[:, seq.blocks[:2]]
    assert torch.equal(got, want.bfloat16().float()) and not torch.equal(got, want)
    sa.close()
    sb.close()


def test_a_full_write_queue_drops_and_counts(redis_server, telemetry) -> None:
    """Publishing never waits: with Redis paused the writer blocks, the queue fills, and later
    blocks are dropped (counted), while the engine goes on."""
    client = redis.Redis.from_url(redis_server.url)
    a = engine()
    sa = store(redis_server.url, telemetry, queue_blocks=2, read_chunk=1, timeout_s=5.0)
    sa.attach(a)
    client.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
    a.prefill(a.new_sequence(), ids(8 * BS + 1, seed=5))  # 8 blocks sealed at once
    assert sa.stats.dropped >= 8 - 2 - 1  # the queue holds 2, the writer at most 1
    assert total(telemetry, kv_store.DROPPED) == sa.stats.dropped
    assert sa.flush(timeout_s=10)
    assert sa.stats.published + sa.stats.dropped == 8
    sa.close()


def test_password_in_the_url(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("requirepass", "s3cret")
    try:
        url = redis_server.url.replace("redis://", "redis://:s3cret@")
        a, b = engine(), engine()
        sa, sb = store(url), store(redis_server.url)  # sb: no password
        sa.attach(a)
        sb.attach(b)
        prompt = ids(2 * BS + 1, seed=6)
        a.prefill(a.new_sequence(), prompt)
        sa.flush()
        assert sa.stats.published == 2
        assert b.adopt_cached(b.new_sequence(), prompt) == 0 and sb.stats.errors == 1  # refused: NOAUTH
        sa.close()
        sb.close()
    finally:
        redis.Redis.from_url(redis_server.url, password="s3cret").config_set("requirepass", "")


def test_rediss_urls_connect_with_tls() -> None:
    s = KVStore("rediss://:pw@kv.example:6380/0")
    assert s._client.connection_pool.connection_class is redis.SSLConnection
    assert s._backoff.url == "rediss://***@kv.example:6380/0"  # what the logs show
    s.close(timeout_s=0.1)


def test_degraded_mode_recomputes_logs_once_and_resumes(redis_server, telemetry, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="specmesh.kv_store")
    a = engine()
    sa = store(redis_server.url, telemetry, initial_backoff_s=0.05, max_backoff_s=0.05)
    sa.attach(a)
    redis_server.kill()
    for seed in range(4):  # every prefill still works, recomputing
        prompt = ids(2 * BS + 1, seed=10 + seed)
        logits, cached = a.prefill_cached(a.new_sequence(), prompt)
        assert cached == 0 and torch.isfinite(logits).all()
        sa.flush()
    assert sa.stats.errors >= 1 and total(telemetry, kv_store.ERRORS) == sa.stats.errors
    assert sa.stats.published == 0
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # once per outage

    redis_server.start()  # same port
    time.sleep(0.1)  # past the backoff
    b = engine()
    sb = store(redis_server.url)
    sb.attach(b)
    prompt = ids(3 * BS + 1, seed=20)
    a.prefill(a.new_sequence(), prompt)  # the first attempt after the backoff reconnects
    sa.flush()
    a.prefill(a.new_sequence(), ids(3 * BS + 1, seed=21))
    sa.flush()
    assert sa.stats.published >= 3
    assert any("is back" in r.message for r in caplog.records)
    assert b.adopt_cached(b.new_sequence(), ids(3 * BS + 1, seed=21)) == 3 * BS
    sa.close()
    sb.close()


def test_settings_come_from_the_environment() -> None:
    s = KVStoreSettings.from_env(
        {"SPECMESH_REDIS_URL": "redis://:pw@h:1/0", "SPECMESH_KV_STORAGE": "bfloat16"}
    )
    assert (s.redis_url, s.kv_storage, s.kv_ttl_seconds) == ("redis://:pw@h:1/0", "bfloat16", 3600)
    assert "pw" not in repr(s)
    with pytest.raises(ValueError, match="SPECMESH_KV_STORAGE"):
        KVStoreSettings.from_env({"SPECMESH_KV_STORAGE": "int4"})
    with pytest.raises(ValueError, match="kv_ttl_seconds must be positive"):
        KVStoreSettings.from_env({"SPECMESH_KV_TTL_SECONDS": "0"})
    assert kv_store.attach_kv_store(engine(), KVStoreSettings()) is None
