"""`specmesh detect | membership | uncertainty`: one text scored by the ScoringService.

- detect: was the text written by a model? One score per detector (log-likelihood, log-rank,
  entropy, Fast-DetectGPT, and Binoculars when the service has an observer model), with the
  direction that means "machine".
- membership: was the text in the model's training data? Min-K%, Min-K%++ and DC-PDD (higher =
  more likely seen).
- uncertainty: how sure was the model, token by token? Probability, entropy and kurtosis of each
  next-token distribution, and their sequence means.

Each runs in-process on --model or, with --address, through a scoring service or a gateway that
relays one (`specmesh up --scoring`). `--json` prints one JSON object instead of a table.
"""

from __future__ import annotations

import argparse
import json
import math

from .scoring_call import (
    add_input_arguments,
    add_service_arguments,
    call,
    json_number,
    prompt_from_args,
    write_page,
)

DETECT_METHODS = ("log_likelihood", "log_rank", "entropy", "binoculars", "fast_detectgpt")
MEMBERSHIP_METHODS = ("min_k", "min_k_plus_plus", "dc_pdd")


def add_parser(sub: argparse._SubParsersAction) -> None:
    detect = _command(sub, "detect", "score how likely a text is machine-written (zero-shot detectors)")
    detect.add_argument(
        "--method",
        action="append",
        choices=DETECT_METHODS,
        help="a detector to run (repeatable; default: every one the service has)",
    )
    detect.add_argument(
        "--per-token", action="store_true", help="with --json: each detector's per-token values"
    )
    detect.set_defaults(func=run_detect)

    membership = _command(sub, "membership", "score how likely a text was in the model's training data")
    membership.add_argument(
        "--method",
        action="append",
        choices=MEMBERSHIP_METHODS,
        help="a membership score to compute (repeatable; default: every one the service has)",
    )
    membership.add_argument(
        "--k-fraction",
        type=float,
        default=0.0,
        help="Min-K%% / Min-K%%++: share of lowest-scoring tokens averaged, in (0, 1] (default 0.2)",
    )
    membership.set_defaults(func=run_membership)

    uncertainty = _command(sub, "uncertainty", "the model's per-token certainty over a text")
    uncertainty.add_argument(
        "--start", type=int, default=0, help="score tokens from this index on (default: 0)"
    )
    uncertainty.add_argument(
        "--html",
        metavar="PATH",
        help="also write one self-contained HTML page: the text as a heat map, hover for values",
    )
    uncertainty.set_defaults(func=run_uncertainty)


def _command(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=summary, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_arguments(p)
    add_service_arguments(p, observer=name == "detect")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _enum_name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def run_detect(args: argparse.Namespace) -> int:
    from specmesh.v1 import scoring_pb2 as S

    methods = [S.DetectMethod.Value(f"DETECT_METHOD_{m.upper()}") for m in args.method or ()]
    request = S.DetectRequest(input=prompt_from_args(args), methods=methods, per_token=args.per_token)
    reply = call(args, "Detect", request, "detect")
    if reply is None:
        return 2
    rows = [
        {
            "method": _enum_name(S.DetectMethod, s.method, "DETECT_METHOD_"),
            "score": json_number(s.score),
            "higher_means_machine": s.higher_means_machine,
            **({"per_token": [round(x, 6) for x in s.per_token]} if args.per_token else {}),
        }
        for s in reply.scores
    ]
    if args.json:
        print(json.dumps({"tokens": len(reply.token_ids), "scores": rows, "total_ms": _ms(reply)}))
        return 0
    print(f"{len(reply.token_ids)} tokens; {_ms(reply):.0f} ms in the service")
    print(f"{'detector':<16} {'score':>10}  machine-written scores")
    for row in rows:
        direction = "higher" if row["higher_means_machine"] else "lower"
        print(f"{row['method']:<16} {_fixed(row['score']):>10}  {direction}")
    return 0


def run_membership(args: argparse.Namespace) -> int:
    from specmesh.v1 import scoring_pb2 as S

    methods = [S.MembershipMethod.Value(f"MEMBERSHIP_METHOD_{m.upper()}") for m in args.method or ()]
    request = S.MembershipRequest(input=prompt_from_args(args), methods=methods, k_fraction=args.k_fraction)
    reply = call(args, "Membership", request, "membership")
    if reply is None:
        return 2
    rows = [
        {
            "method": _enum_name(S.MembershipMethod, s.method, "MEMBERSHIP_METHOD_"),
            "score": json_number(s.score),
        }
        for s in reply.scores
    ]
    if args.json:
        print(json.dumps({"scores": rows, "total_ms": _ms(reply)}))
        return 0
    print(f"{'score':<16} {'value':>10}  (higher = more likely in the training data)")
    for row in rows:
        print(f"{row['method']:<16} {_fixed(row['score']):>10}")
    return 0


def run_uncertainty(args: argparse.Namespace) -> int:
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer
    from specmesh.v1 import scoring_pb2 as S

    request = S.UncertaintyRequest(input=prompt_from_args(args), start=args.start)
    reply = call(args, "Uncertainty", request, "uncertainty")
    if reply is None:
        return 2
    tokenizer = Tokenizer.from_dir(resolve_model(args.model))
    tokens = [
        {
            "id": t,
            "text": tokenizer.decode([t], skip_special_tokens=False),
            "probability": float(f"{math.exp(lp):.6g}"),  # significant digits: p can be tiny
            "entropy": round(h, 6),
            "kurtosis": round(k, 6),
        }
        # token_ids are the scored tokens, from --start on
        for t, lp, h, k in zip(reply.token_ids, reply.logprob, reply.entropy, reply.kurtosis, strict=True)
    ]
    summary = {
        "geometric_mean_prob": json_number(reply.geometric_mean_prob),
        "arithmetic_mean_prob": json_number(reply.arithmetic_mean_prob),
        "mean_entropy": json_number(reply.mean_entropy),
        "mean_kurtosis": json_number(reply.mean_kurtosis),
    }
    if args.html:
        page_data = {"start": args.start, "tokens": tokens, **summary}
        write_page(args.html, "uncertainty", args, uncertainty=page_data)
    if args.json:
        print(json.dumps({"tokens": tokens, **summary, "total_ms": _ms(reply)}))
        return 0
    print(f"{'#':>4}  {'token':<16} {'p':>9} {'entropy':>8} {'kurtosis':>9}")
    for i, tok in enumerate(tokens, start=args.start):
        print(
            f"{i:>4}  {tok['text']!r:<16} {tok['probability']:>9.3g} {tok['entropy']:>8.3f} "
            f"{tok['kurtosis']:>9.2f}"
        )
    print(
        f"geometric mean p {_fixed(summary['geometric_mean_prob'])}, arithmetic mean p "
        f"{_fixed(summary['arithmetic_mean_prob'])}, mean entropy {_fixed(summary['mean_entropy'])} nats, "
        f"mean kurtosis {_fixed(summary['mean_kurtosis'])}"
    )
    return 0


def _ms(reply) -> float:
    return round(reply.timing.total_ns / 1e6, 3)


def _fixed(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
