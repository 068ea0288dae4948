"""`specmesh bench route`: policy r2r against target, draft and speculative (bench/route.py).

Hooked into `specmesh bench` by ``add_route_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _thresholds(value: str) -> list[float]:
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be in [0, 1], got {value!r}")
    return values


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_route_parser(bench_sub: argparse._SubParsersAction) -> None:
    from bench.route import DEFAULT_SWEEP

    p = bench_sub.add_parser(
        "route",
        help="token routing (policy r2r) vs target, draft and speculative: speed, target share, quality",
        description="Starts the local stack (target, draft with its router, gateway) and runs every prompt "
        "greedily under policies target, draft, speculative, r2r (the router's own threshold) and auto "
        "(quality fast as `auto`, exact and high as `auto:exact`, `auto:high`, with the policy it chose), "
        "in a rotating order, then r2r at each --thresholds value. Reports per policy tokens_per_s, "
        "speedup_vs_target, target_share (output tokens the target produced), target_nll (the target's "
        "mean negative log-likelihood of the output, nats/token), exact_match with the target-only "
        "output, and for r2r nll_gap_closed = (NLL_draft - NLL_r2r) / (NLL_draft - NLL_target); the "
        "router's held-out precision/recall (from its router.json); a PNG of the quality/speed "
        "frontier over the thresholds. Needs a router next to the draft (`specmesh train router`).",
        epilog="Example: specmesh bench route --prompts bench/prompts/chat.jsonl --prompts "
        "bench/prompts/code.jsonl --max-new-tokens 64 --out route.json",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="prompt set (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, help="tokens per request (default: %(default)s)"
    )
    p.add_argument(
        "--thresholds",
        type=_thresholds,
        default=list(DEFAULT_SWEEP),
        metavar="T1,T2",
        help="r2r thresholds to sweep for the frontier (default: %(default)s)",
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="first N prompts of each set")
    p.add_argument(
        "--target-model", default="smollm2-135m-instruct", help="target model (default: %(default)s)"
    )
    p.add_argument(
        "--draft-model",
        default="smollm2-135m-instruct-draft",
        help="draft model with a router (default: %(default)s)",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads of each service")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-request deadline, seconds (default: %(default)s)"
    )
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.route import format_summary, run_route_bench
    from services.core.errors import SpecmeshError
    from specmesh.stack import StackError

    for path in args.prompts:
        if not path.is_file():
            print(f"specmesh bench route: --prompts {path}: no such file", file=sys.stderr)
            return 2
    try:
        result = run_route_bench(
            args.prompts,
            out=args.out,
            max_new_tokens=args.max_new_tokens,
            thresholds=args.thresholds,
            limit=args.limit,
            target_model=args.target_model,
            draft_model=args.draft_model,
            threads=args.threads,
            timeout=args.timeout,
            png=not args.no_png,
            progress=not args.no_progress,
        )
    except (StackError, SpecmeshError) as exc:
        print(f"specmesh bench route: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return 0
