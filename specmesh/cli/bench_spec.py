"""`specmesh bench spec`: speculative decoding through the real gRPC stack.

Hooked into `specmesh bench` by ``add_spec_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.core.strategies import STRATEGY_CLI_NAMES, STRATEGY_NAMES, strategy_arg


def _strategies(value: str) -> list[str]:
    """A comma-separated list, each name spelled either way (``dynamic-tree``, ``dynamic_tree``);
    the results keep the ``_`` names as their keys."""
    names = [v for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            "no strategy; use a comma-separated subset of " + ",".join(STRATEGY_CLI_NAMES)
        )
    return [strategy_arg(n).value for n in names]


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _temperature(value: str) -> float:
    t = float(value)
    if not t >= 0.0 or t == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return t


def add_spec_parser(bench_sub: argparse._SubParsersAction) -> None:
    from specmesh.cli.up import DEFAULT_OMP_SPINCOUNT, add_weights_args

    cores = os.cpu_count() or 1
    p = bench_sub.add_parser(
        "spec",
        help="speculative decoding through the gRPC stack vs the target alone and vs transformers",
        description="Runs the same prompts through the gateway with policy=target (baseline), "
        "policy=speculative for each draft strategy (and adaptive variants with --adaptive) and "
        "optionally policy=draft, plus transformers' plain and assisted generation (assistant_model = "
        "the same draft) in this process. Starts the local stack (Redis, target, draft, gateway) "
        "unless --gateway is given. Reports tokens/s, tau (mean tokens per verification round "
        "counting the bonus token), acceptance rate, speedup_vs_target, speedup_vs_hf_assisted and "
        "greedy_identical (T=0: every speculative output equals the target-only output; exit "
        "status 1 if not, or if requests failed), greedy_identical_fraction, and for each mismatch "
        "the target's logit margin at the first differing token (a floating-point near-tie or not).",
        epilog="Example: specmesh bench spec --prompts bench/prompts/chat.jsonl "
        "--prompts bench/prompts/code.jsonl --max-new-tokens 64 --temperature 0 --out spec.json",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help='prompt set, one {"prompt": ..., "chat": true|false} per line (repeatable)',
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, help="tokens per request (default: %(default)s)"
    )
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument(
        "--gateway", default=None, metavar="ADDR", help="use this gateway instead of starting the local stack"
    )
    p.add_argument(
        "--target-model",
        default="smollm2-135m-instruct",
        help="target model name or HF directory (default: %(default)s)",
    )
    p.add_argument(
        "--draft-model",
        default="smollm2-135m-instruct-draft",
        help="draft model name or HF directory (default: %(default)s)",
    )
    p.add_argument(
        "--strategies",
        type=_strategies,
        default=list(STRATEGY_NAMES),
        metavar="S1,S2",
        help="draft strategies to run, comma-separated (default: all: " + ",".join(STRATEGY_CLI_NAMES) + ")",
    )
    p.add_argument("--adaptive", action="store_true", help="also run each strategy with the adaptive budget")
    p.add_argument(
        "--compare-lookup",
        action="store_true",
        help="also run each model strategy with lookup_tokens=0: without the prompt-lookup path the draft "
        "merges into model-drafted trees by default (runs named ...:no-lookup)",
    )
    p.add_argument("--draft-policy", action="store_true", help="also run policy=draft (the draft alone)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N prompts of each set")
    p.add_argument(
        "--seed", type=int, default=0, help="prompt i is sampled with seed + i (default: %(default)s)"
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument(
        "--ignore-eos", action="store_true", help="always generate --max-new-tokens (EOS does not stop)"
    )
    p.add_argument(
        "--target-threads",
        type=_positive_int,
        default=cores,
        help="torch threads of the target service (default: %(default)s; ignored with --gateway)",
    )
    p.add_argument(
        "--draft-threads",
        type=_positive_int,
        default=cores,
        help="torch threads of the draft service (default: %(default)s; ignored with --gateway)",
    )
    add_weights_args(p, note="; ignored with --gateway")
    p.add_argument(
        "--omp-spincount",
        type=int,
        default=DEFAULT_OMP_SPINCOUNT,
        help="GOMP_SPINCOUNT of the stack's services (default: %(default)s, as `specmesh up`; -1 = "
        "OpenMP's default; ignored with --gateway)",
    )
    p.add_argument(
        "--hf-threads",
        type=_positive_int,
        default=None,
        help="torch threads of the transformers runs (default: --target-threads)",
    )
    p.add_argument(
        "--hf-assistant-tokens",
        type=_positive_int,
        default=None,
        help="transformers' num_assistant_tokens (default: transformers' own default)",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "inherit"),
        default="inherit",
        help="OMP_WAIT_POLICY for this process and every stack process (inherit: leave the environment, "
        "i.e. OpenMP's default of spinning briefly between parallel regions, fastest on an idle machine); "
        "passive keeps multi-threaded torch usable when other jobs load the cores (default: %(default)s)",
    )
    p.add_argument("--no-redis", action="store_true", help="start the local stack without Redis")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-request deadline in seconds (default: %(default)s)"
    )
    p.add_argument("--stack-log", type=Path, default=None, help="stack logs (default: OUT with .stack.log)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _import_bench_spec():
    try:
        from bench import spec
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.spec", "bench.decode"):
            raise
        # bench/ sits at the repository root and is not installed: use the source checkout.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from bench import spec
    return spec


def run(args: argparse.Namespace) -> int:
    spec = _import_bench_spec()
    for path in args.prompts:
        if not path.is_file():
            print(f"specmesh bench spec: --prompts {path}: no such file", file=sys.stderr)
            return 2
    try:
        result = spec.run_spec_bench(
            args.prompts,
            out=args.out,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            gateway=args.gateway,
            target_model=args.target_model,
            draft_model=args.draft_model,
            strategies=args.strategies,
            adaptive=args.adaptive,
            compare_lookup=args.compare_lookup,
            draft_policy=args.draft_policy,
            limit=args.limit,
            seed=args.seed,
            hf=not args.no_hf,
            target_threads=args.target_threads,
            draft_threads=args.draft_threads,
            draft_int8=args.draft_int8,
            target_weights=args.target_weights,
            omp_spincount=None if args.omp_spincount < 0 else args.omp_spincount,
            hf_threads=args.hf_threads,
            hf_num_assistant_tokens=args.hf_assistant_tokens,
            ignore_eos=args.ignore_eos,
            redis=not args.no_redis,
            request_timeout=args.timeout,
            omp_wait_policy=args.omp_wait_policy,
            stack_log=args.stack_log,
            progress=not args.no_progress,
            png=not args.no_png,
        )
    except ValueError as exc:
        print(f"specmesh bench spec: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from services.core.errors import SpecmeshError
        from specmesh.stack import StackError

        if isinstance(exc, StackError | SpecmeshError):
            print(f"specmesh bench spec: {exc}", file=sys.stderr)
            return 1
        raise
    print(spec.format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    if result["png_note"] and not args.no_png:
        print(f"note: {result['png_note']}")
    if result["failed_requests"]:
        print(f"{len(result['failed_requests'])} requests failed (see failed_requests)", file=sys.stderr)
        return 1
    return 0 if result["greedy_identical"] is not False else 1
