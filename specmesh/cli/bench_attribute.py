"""`specmesh bench attribute`: ReAGent vs gradient x input vs random through a scoring service
(bench/attribute.py).

Hooked into `specmesh bench` by ``add_attribute_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_attribute_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "attribute",
        help="input attribution: ReAGent vs gradient x input vs random, soft sufficiency/comprehensiveness",
        description="Starts a scoring service (`specmesh serve scoring`) and attributes the target's "
        "greedy continuation of every prompt with ReAGent, gradient x input and random scores, in a "
        "rotating order, with the prompt's index as the seed (the "
        "faithfulness masks are then the same for the three methods). Reports per method the mean soft "
        "normalised sufficiency and comprehensiveness (Zhao & Aletras 2023; higher is better) and seconds "
        "per prompt; per baseline the mean paired difference ReAGent - baseline with a 95%% bootstrap "
        "interval and the Wilcoxon signed-rank test; the CPU model and the commit.",
        epilog="Example: specmesh bench attribute --prompts bench/prompts/chat.jsonl --prompts "
        "bench/prompts/code.jsonl --prompts bench/prompts/heldout_extra.jsonl --max-new-tokens 4 "
        "--out bench/results/attribute.json",
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
        "--max-new-tokens",
        type=_positive_int,
        default=4,
        help="target tokens explained per prompt, at most 32 (default: %(default)s)",
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="first N prompts of each set")
    p.add_argument("--model", default="smollm2-135m-instruct", help="scored model (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads of the service")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-call deadline, seconds (default: %(default)s)"
    )
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.attribute import format_summary, run_attribute_bench
    from services.core.errors import SpecmeshError
    from specmesh.stack import StackError

    for path in args.prompts:
        if not path.is_file():
            print(f"specmesh bench attribute: --prompts {path}: no such file", file=sys.stderr)
            return 2
    try:
        result = run_attribute_bench(
            args.prompts,
            out=args.out,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            model=args.model,
            threads=args.threads,
            timeout=args.timeout,
            png=not args.no_png,
            progress=not args.no_progress,
        )
    except (StackError, SpecmeshError) as exc:
        print(f"specmesh bench attribute: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return 0
