"""`specmesh bench kv`: KV prefix reuse through real target services and Redis (bench/kv.py).

Hooked into `specmesh bench` by ``add_kv_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _at_least(low: int):
    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def add_kv_parser(bench_sub: argparse._SubParsersAction) -> None:
    from services.runtime.settings import KV_STORAGE

    p = bench_sub.add_parser(
        "kv",
        help="KV prefix reuse: TTFT cold / warm from memory / warm from Redis, Redis bytes/s, chat",
        description="Starts Redis (the embedded Valkey unless --redis-url) and two target service "
        "processes sharing it, then measures in one run: time to first token (a Prefill RPC) for a "
        "long prompt cold on replica A, again on A (its own KV pool) and on replica B (restored from "
        "the blocks A published), as ttft_speedup_memory and ttft_speedup_redis; Redis bytes/s of "
        "the KV adapter's pipelined reads and writes for one block's value size against "
        "valkey-benchmark / redis-benchmark when on PATH (else the plain client, one request per "
        "round trip); and an 8-turn chat re-sending the whole conversation each turn, reporting the "
        "prefill tokens saved on the same and on the other replica.",
        epilog="Example: specmesh bench kv --out bench/results/kv.json",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="target model name or HF directory (default: %(default)s)",
    )
    p.add_argument(
        "--prompt-tokens", type=_at_least(32), default=1024, help="long prompt length (default: %(default)s)"
    )
    p.add_argument(
        "--repeats", type=_at_least(1), default=3, help="fresh prompts timed (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=_at_least(1),
        default=os.cpu_count() or 1,
        help="torch threads of each target service (default: %(default)s)",
    )
    p.add_argument("--redis-url", default=None, help="an existing Redis / Valkey instead of starting one")
    p.add_argument(
        "--chat-reply-tokens",
        type=_at_least(1),
        default=32,
        help="greedy tokens of each assistant reply in the chat (default: %(default)s)",
    )
    p.add_argument(
        "--kv-storage",
        choices=KV_STORAGE,
        default="exact",
        help="precision the services publish KV in (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from bench import kv
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.kv"):
            raise
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed
        from bench import kv
    try:
        result = kv.run_kv_bench(
            out=args.out,
            model=args.model,
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            threads=args.threads,
            redis_url=args.redis_url,
            chat_reply_tokens=args.chat_reply_tokens,
            progress=not args.no_progress,
            kv_storage=args.kv_storage,
        )
    except Exception as exc:
        from services.core.errors import SpecmeshError
        from specmesh.stack import StackError

        if isinstance(exc, StackError | SpecmeshError | ValueError):
            print(f"specmesh bench kv: {exc}", file=sys.stderr)
            return 1
        raise
    print(kv.format_summary(result))
    print(f"wrote {result['json']}")
    return 0
