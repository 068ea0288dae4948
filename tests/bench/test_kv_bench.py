"""`specmesh bench kv`: its pieces against a real Valkey and the real tokenizer (the full run
starts two SmolLM2 services and takes minutes: `specmesh bench kv`, not the test suite). No
timing is asserted, only that the measurements are made and named as the JSON says."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import redis


@pytest.fixture(scope="module")
def kv_bench():
    from bench import kv

    return kv


def test_long_prompts_have_the_length_asked_and_differ_per_repeat(kv_bench, smollm2_dir) -> None:
    from services.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    first, second = kv_bench.long_prompt(tok, 1024, 0), kv_bench.long_prompt(tok, 1024, 1)
    assert len(first) == len(second) == 1024
    assert first[:16] != second[:16]  # a cold run finds no block of the previous repeat


def test_throughput_measures_the_adapter_and_a_named_baseline(kv_bench, redis_server) -> None:
    result = kv_bench.throughput(redis_server.url, value_bytes=65536, n_values=8, chunk=4)
    for op in ("set", "get"):
        assert result["adapter_bytes_per_s"][op] > 0 and math.isfinite(result["ratio_vs_baseline"][op])
    assert result["baseline"].split(" ")[0] in ("redis-benchmark", "valkey-benchmark", "client_single")
    assert not redis.Redis.from_url(redis_server.url).keys("specmesh:bench:*")  # cleaned up


def test_wait_published_sees_the_keys_the_services_write(kv_bench, redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    keys = kv_bench.published_keys(list(range(40)), "digest", 16)
    assert len(keys) == 2 and all(k.startswith(b"specmesh:kv:") for k in keys)
    with pytest.raises(RuntimeError, match="not published"):
        kv_bench.wait_published(client, keys, timeout_s=0.05)
    for k in keys:
        client.set(k, b"x")
    assert kv_bench.wait_published(client, keys) >= 0


def test_cli_help_explains_the_measurements() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "specmesh.cli.main", "bench", "kv", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for words in ("ttft_speedup_memory", "ttft_speedup_redis", "redis-benchmark", "8-turn chat"):
        assert words in " ".join(out.split()), words
