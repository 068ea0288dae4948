"""`specmesh bench detect`: the scoring service's machine-text detectors on a human and a machine
text set (bench/detect.py).

Hooked into `specmesh bench` by ``add_detect_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmesh.cli.bench_attribute import _positive_int

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OBSERVER = "smollm2-135m-instruct-draft"  # same tokenizer as the default model


def add_detect_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "detect",
        help="machine-text detectors: AUROC, TPR at 1%% FPR, texts/s sequential and 16 in flight",
        description="Starts a scoring service (`specmesh serve scoring`, with --observer for Binoculars) "
        "and scores every human and machine text with every detection method the service offers, one "
        "Detect call at a time. Per method (scores oriented so that higher = machine): AUROC with machine "
        "texts as the positive class (Mann-Whitney, ties count one half), the TPR at the threshold that "
        "lets at most 1% of the human texts through (and the FPR achieved: 0 with fewer than 100 human "
        "texts), counts, and the published AUROC for scale beside Binoculars and Fast-DetectGPT. Then the "
        "same texts with 16 calls in flight, so that the service's batching shows: texts/s of both "
        "passes and their ratio. Writes JSON (+ a PNG of the ROC curves) and prints a table.",
        epilog="Example: specmesh bench detect --human human.jsonl --machine machine.jsonl --limit 50 "
        "--out bench/results/detect.json",
    )
    p.add_argument(
        "--human",
        type=Path,
        required=True,
        metavar="H.jsonl",
        help='human-written texts, one {"text": ...} a line',
    )
    p.add_argument(
        "--machine",
        type=Path,
        required=True,
        metavar="M.jsonl",
        help='machine-generated texts, one {"text": ...} a line',
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N texts of each file")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="scored model, Binoculars' performer (default: %(default)s)"
    )
    p.add_argument(
        "--observer",
        default=DEFAULT_OBSERVER,
        help="Binoculars' observer, sharing --model's tokenizer; `none` = no observer, no BINOCULARS "
        "(default: %(default)s)",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads of the service")
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="host:port of a running scoring service (or a gateway started with --scoring) instead of "
        "starting one; --model, --observer and --threads are then the service's own",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-call deadline, seconds (default: %(default)s)"
    )
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from bench.detect import format_summary, run_detect_bench
    from services.core.errors import SpecmeshError
    from specmesh.stack import StackError

    for flag, path in (("--human", args.human), ("--machine", args.machine)):
        if not path.is_file():
            print(f"specmesh bench detect: {flag} {path}: no such file", file=sys.stderr)
            return 2
    observer = None if args.observer.lower() == "none" else args.observer
    try:
        result = run_detect_bench(
            args.human,
            args.machine,
            out=args.out,
            limit=args.limit,
            model=args.model,
            observer=observer,
            threads=args.threads,
            timeout=args.timeout,
            address=args.address,
            png=not args.no_png,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        print(f"specmesh bench detect: {exc}", file=sys.stderr)
        return 2
    except (StackError, SpecmeshError) as exc:
        print(f"specmesh bench detect: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"specmesh bench detect: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return 0
