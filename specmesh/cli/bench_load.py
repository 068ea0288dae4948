"""`specmesh bench load`: concurrent streaming load through the gateway (bench/load).

Hooked into `specmesh bench` by ``add_load_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive(kind):
    def parse(value: str):
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
        if not n > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return n

    return parse


def add_load_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "load",
        help="concurrent streaming requests through the gateway: latency percentiles and tokens/s",
        description="Starts the local stack (target, draft, gateway as processes) and streams greedy "
        "requests through the gateway from N concurrent clients, each sending one request after "
        "another, at 1, 8 and --concurrency streams for --duration seconds each (streams still open "
        "then are cancelled and counted as cut_at_end). Prompts are of mixed "
        "lengths (the prompt files' prompts and long prompts joined from three of them); policies "
        "alternate between target and speculative. Reports errors (count and status codes), p50/p99 "
        "time to first token and per output token, aggregate tokens/s per level, "
        "throughput_gain_8_vs_1, and the services' resident memory after warm-up and at the end. With "
        "--batching both (the default) the sweep runs twice, the stack started with dynamic batching "
        "on and then off, and the JSON compares the two.",
        epilog="Example: specmesh bench load --concurrency 32 --duration 60 --out load.json",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    p.add_argument(
        "--concurrency",
        type=_positive(int),
        default=32,
        help="highest number of concurrent streams; the sweep is 1, 8, ... up to it (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=60.0,
        help="seconds each level lasts; streams still open then are cut off, their tokens so far "
        "counted (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive(int), default=32, help="tokens per request (default: %(default)s)"
    )
    p.add_argument(
        "--batching",
        choices=("both", "on", "off"),
        default="both",
        help="run with dynamic batching on, off, or both one after the other (default: %(default)s)",
    )
    p.add_argument(
        "--policies",
        default="target,speculative",
        help="comma-separated policies the requests cycle through (default: %(default)s)",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="target model (default: %(default)s)")
    p.add_argument(
        "--draft-model", default="smollm2-135m-instruct-draft", help="draft model (default: %(default)s)"
    )
    p.add_argument("--target-threads", type=_positive(int), default=None, help="torch threads of the target")
    p.add_argument("--draft-threads", type=_positive(int), default=None, help="torch threads of the draft")
    p.add_argument(
        "--prompts",
        type=Path,
        action="append",
        default=None,
        help="JSONL prompt file (repeatable; default: bench/prompts/chat.jsonl and code.jsonl)",
    )
    p.set_defaults(func=run_load)


def run_load(args: argparse.Namespace) -> int:
    from bench.load.benchmark import format_summary, run_load_bench
    from bench.load.config import LoadBenchConfig
    from gateway.config import policy_value

    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    for name in policies:
        policy_value(name)  # an unknown name is a one-line error (a SpecmeshError)
    kw = dict(prompt_files=tuple(args.prompts)) if args.prompts else {}
    cfg = LoadBenchConfig(
        out=args.out,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_new_tokens=args.max_new_tokens,
        policies=policies,
        batching=args.batching,
        target_model=args.model,
        draft_model=args.draft_model,
        target_threads=args.target_threads,
        draft_threads=args.draft_threads,
        **kw,
    )
    result = run_load_bench(cfg)
    print(format_summary(result))
    print(f"wrote {args.out}")
    return 1 if any(mode["errors"] for mode in result["modes"].values()) else 0
