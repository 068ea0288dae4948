"""`specmesh attribute`: which context tokens each generated token depends on (ScoringService.Attribute).

Prints one row per target token: its soft normalised sufficiency (NS) and comprehensiveness (NC)
(higher is better, "-" where the context is worth nothing to the token), ReAGent's update steps
(`*` = its stopping rule was met) and the context tokens it depends on most, with their
importance. `--json` prints one JSON object instead. Runs in-process on --model or, with --address,
through a running scoring service (`specmesh serve scoring`) or a gateway that relays one.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from .scoring_call import add_service_arguments, call, json_number, write_page

METHODS = ("reagent", "gradient_x_input", "random")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attribute",
        help="attribute generated tokens to the context tokens they depend on (ReAGent)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prompt", default="What is the capital of France?", help="the context (default: %(default)s)"
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the prompt as a chat user message through the model's chat template (default: yes)",
    )
    p.add_argument("--target", default="", help="the continuation to explain (default: the greedy one)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="greedy target length, 1-32 (0 = default 8)")
    p.add_argument("--method", choices=METHODS, default="reagent", help="default: %(default)s")
    p.add_argument(
        "--replace-ratio",
        type=int,
        default=0,
        metavar="PCT",
        help="ReAGent: %% of context replaced per sample",
    )
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--top", type=int, default=3, help="context tokens shown per target token (default: 3)")
    add_service_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--html",
        metavar="PATH",
        help="also write one self-contained HTML page: the context as a heat map per generated token",
    )
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    from specmesh.v1 import common_pb2, scoring_pb2

    if args.chat:
        chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=args.prompt)])
        context = common_pb2.Prompt(chat=chat)
    else:
        context = common_pb2.Prompt(text=args.prompt)
    return scoring_pb2.AttributeRequest(
        context=context,
        target_text=args.target,
        max_new_tokens=args.max_new_tokens,
        replace_ratio_percent=args.replace_ratio,
        seed=args.seed,
        method=scoring_pb2.AttributionMethod.Value(f"ATTRIBUTION_METHOD_{args.method.upper()}"),
    )


def as_json(reply, decode) -> dict:
    from specmesh.v1 import scoring_pb2

    return {
        "method": scoring_pb2.AttributionMethod.Name(reply.method)
        .removeprefix("ATTRIBUTION_METHOD_")
        .lower(),
        "replacement_model": reply.replacement_model or None,
        "context": [{"id": t, "text": decode(t)} for t in reply.context_token_ids],
        "target": [{"id": t, "text": decode(t)} for t in reply.target_token_ids],
        "attributions": [
            {
                "target_index": a.target_index,
                "importance": [round(x, 6) for x in a.importance],
                "soft_sufficiency": json_number(a.soft_sufficiency),
                "soft_comprehensiveness": json_number(a.soft_comprehensiveness),
                "steps": a.steps,
                "stopped": a.stopped,
            }
            for a in reply.attributions
        ],
        "soft_sufficiency": json_number(reply.soft_sufficiency),
        "soft_comprehensiveness": json_number(reply.soft_comprehensiveness),
        "total_ms": reply.timing.total_ns / 1e6,
    }


def format_table(reply, decode, top: int) -> str:
    def metric(x: float) -> str:
        return "    -" if math.isnan(x) else f"{x:5.2f}"

    target_text = "".join(decode(t) for t in reply.target_token_ids)
    head = (
        f"context: {len(reply.context_token_ids)} tokens; target: {target_text!r} "
        f"({len(reply.target_token_ids)} tokens)"
    )
    if reply.replacement_model:
        head += f"; replacements from {reply.replacement_model}"
    lines = [
        head,
        f"{'#':>3}  {'target':<14} {'NS':>5} {'NC':>5} {'steps':>5}  top context tokens (importance)",
    ]
    for a, token in zip(reply.attributions, reply.target_token_ids, strict=True):
        order = sorted(range(len(a.importance)), key=lambda i: -a.importance[i])[:top]
        tops = "  ".join(f"{decode(reply.context_token_ids[i])!r} {a.importance[i]:.3g}" for i in order)
        steps = f"{a.steps}{'*' if a.stopped else ''}" if a.steps else "-"
        lines.append(
            f"{a.target_index:>3}  {decode(token)!r:<14} {metric(a.soft_sufficiency)} "
            f"{metric(a.soft_comprehensiveness)} {steps:>5}  {tops}"
        )
    lines.append(
        f"mean soft sufficiency {metric(reply.soft_sufficiency).strip()}, soft comprehensiveness "
        f"{metric(reply.soft_comprehensiveness).strip()} (higher is better); "
        f"{reply.timing.total_ns / 1e9:.2f} s in the service"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(resolve_model(args.model))
    request = build_request(args)
    start = time.perf_counter()
    reply = call(args, "Attribute", request, "attribute")
    if reply is None:
        return 2

    def decode(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    result = as_json(reply, decode)
    if args.json:
        print(json.dumps(result | {"wall_s": round(time.perf_counter() - start, 3)}))
    else:
        print(format_table(reply, decode, args.top))
    if args.html:
        write_page(args.html, "attribution", args, attribution=result)
    return 0
