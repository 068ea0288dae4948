"""`specmesh bench membership`: Min-K%, Min-K%++, DC-PDD and the loss baseline on a model whose
training data is known exactly (bench/membership.py; the model from `specmesh train membership`).

Hooked into `specmesh bench` by ``add_membership_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmesh.cli.bench_attribute import _positive_int

DEFAULT_MODEL = "smollm2-135m-instruct-draft-members"  # what `specmesh train membership` writes


def add_membership_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "membership",
        help="membership inference on a model with known training data: AUROC per method, control",
        description="Starts a scoring service on --model (a directory from `specmesh train membership`, "
        "holding members.jsonl and nonmembers.jsonl) and scores every member and non-member text "
        "through Membership (Min-K%, Min-K%++, DC-PDD) and Uncertainty (the loss baseline: mean "
        "log-likelihood), then the same on the model it was fine-tuned from, which saw neither side "
        "(the control: AUROC near 0.5). Per method: AUROC with members positive, a bootstrap 95% "
        "interval, TPR at 1% FPR; and DC-PDD minus Min-K% with a paired interval. Writes JSON (+ a PNG "
        "of the ROC curves) and prints a table.",
        epilog="Example: specmesh train membership && specmesh bench membership "
        "--out bench/results/membership.json",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="membership model name or directory (default: %(default)s)"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    p.add_argument(
        "--base",
        default=None,
        help="control model (default: the base named in the model's train_report.json; none = skip)",
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="first N texts of each side")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads of the service")
    p.add_argument(
        "--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples (default: %(default)s)"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-call deadline, seconds (default: %(default)s)"
    )
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from bench.membership import MEMBERS_FILE, NONMEMBERS_FILE, format_summary, run_membership_bench
    from services.core.errors import SpecmeshError
    from services.core.model_store import resolve_model
    from specmesh.stack import StackError

    try:
        model_dir = resolve_model(args.model)
    except SpecmeshError as exc:
        print(
            f"specmesh bench membership: {exc} (build it with `specmesh train membership`)", file=sys.stderr
        )
        return 2
    for name in (MEMBERS_FILE, NONMEMBERS_FILE):
        if not (model_dir / name).is_file():
            print(
                f"specmesh bench membership: {model_dir} has no {name} "
                "(not made by `specmesh train membership`)",
                file=sys.stderr,
            )
            return 2
    try:
        result = run_membership_bench(
            model_dir,
            out=args.out,
            base=args.base,
            limit=args.limit,
            threads=args.threads,
            timeout=args.timeout,
            bootstrap=args.bootstrap,
            png=not args.no_png,
            progress=not args.no_progress,
        )
    except (StackError, SpecmeshError) as exc:
        print(f"specmesh bench membership: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"specmesh bench membership: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return 0
