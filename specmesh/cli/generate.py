"""`specmesh generate`: ask the gateway for a completion, stream it to stdout, report speed.

Prints the answer as it is accepted, then on stderr: tokens, tokens/s, time to first token,
and for the speculative policy the mean accepted length (tau, counting the bonus token), the
acceptance along the verified path (overall and per depth) and per drafted node, and the number
of verification rounds; the gateway's warnings (policy draft) go to stderr first. `--json`
prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from services.core.strategies import POLICY_NAMES, STRATEGY_METAVAR, strategy_arg

ENV_GATEWAY = "SPECMESH_GATEWAY_ADDRESS"
DEFAULT_GATEWAY = "127.0.0.1:50050"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate through the gateway (see `specmesh up`) and report tokens/s and acceptance",
        description=__doc__,
    )
    p.add_argument(
        "--prompt",
        default="What is the capital of France?",
        help="the prompt, a user message with --chat (default: %(default)s)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the prompt as a chat user message through the model's chat template (default: yes)",
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument(
        "--gateway",
        default=os.environ.get(ENV_GATEWAY, DEFAULT_GATEWAY),
        metavar="ADDR",
        help=f"gateway host:port [{ENV_GATEWAY}, default %(default)s]",
    )
    p.add_argument(
        "--tls-ca-file",
        default=os.environ.get("SPECMESH_TLS_CA_FILE"),
        metavar="PEM",
        help="connect with TLS, trusting this CA [SPECMESH_TLS_CA_FILE]",
    )
    p.add_argument(
        "--auth-token",
        default=os.environ.get("SPECMESH_AUTH_TOKEN"),
        metavar="TOKEN",
        help="bearer token the gateway requires [SPECMESH_AUTH_TOKEN; prefer it: flags show in ps]",
    )
    p.add_argument("--model", default="", help="target model name (default: the gateway's)")
    p.add_argument(
        "--policy", choices=POLICY_NAMES, default=None, help="default: the gateway's (speculative)"
    )
    p.add_argument(
        "--quality",
        choices=("exact", "high", "fast"),
        default=None,
        help="what policy auto may trade for speed: exact = the target's output (target or speculative), "
        "high = close to it (r2r on easy prompts), fast = fastest (r2r or the draft); exact is also "
        "accepted with the lossless policies (default: unset, auto takes it as exact)",
    )
    p.add_argument(
        "--route-threshold",
        type=float,
        default=None,
        metavar="T",
        help="policies r2r / auto: route a draft token to the target when the router's divergence "
        "probability exceeds T, in [0, 1] (lower: more target tokens; default: the router's own)",
    )
    p.add_argument(
        "--kv-budget",
        type=int,
        default=None,
        metavar="N",
        help="policy target: decode keeping at most N keys per layer and KV head (H2O: heavy hitters "
        "plus a recent window), for long contexts in bounded memory; approximate output (default: the "
        "full cache)",
    )
    p.add_argument(
        "--kv-recent-share",
        type=float,
        default=0.0,
        metavar="F",
        help="with --kv-budget: share of the N keys kept as the recent window, in (0, 1] (default: 0.75)",
    )
    p.add_argument(
        "--strategy", type=strategy_arg, metavar=STRATEGY_METAVAR, default=None, help="default: the gateway's"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random stream (default: fresh)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    b = p.add_argument_group("speculative budget (0 = the gateway's default)")
    b.add_argument("--max-nodes", type=int, default=0)
    b.add_argument("--max-depth", type=int, default=0)
    b.add_argument("--branching", type=int, default=0)
    b.add_argument("--num-candidates", type=int, default=0)
    b.add_argument(
        "--lookup-tokens",
        type=int,
        default=None,
        help="prompt-lookup tokens merged into model-drafted trees (0 = off; default: the gateway's)",
    )
    b.add_argument(
        "--adaptive",
        action="store_true",
        help="pick each round's draft depth from measured acceptance and costs (0 = target alone)",
    )
    b.add_argument("--vocab-limit", type=int, default=0, help="draft vocabulary limit (0 = full)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the output and stats")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    from gateway.budget import strategy_value
    from gateway.config import policy_value
    from services.core.errors import InvalidArgument
    from specmesh.v1 import common_pb2, gateway_pb2

    if args.chat:
        messages = []
        if args.system:
            messages.append(common_pb2.ChatMessage(role="system", content=args.system))
        messages.append(common_pb2.ChatMessage(role="user", content=args.prompt))
        prompt = common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages))
    else:
        prompt = common_pb2.Prompt(text=args.prompt)
    sampling = common_pb2.SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    spec = gateway_pb2.SpecOptions(
        strategy=strategy_value(args.strategy) if args.strategy else 0,
        budget=common_pb2.TreeBudget(
            max_nodes=args.max_nodes,
            max_depth=args.max_depth,
            branching=args.branching,
            num_candidates=args.num_candidates,
            lookup_tokens=args.lookup_tokens,
        ),
        adaptive=args.adaptive,
        vocab_limit=args.vocab_limit,
    )
    request = gateway_pb2.GatewayGenerateRequest(
        model=args.model,
        prompt=prompt,
        sampling=sampling,
        policy=policy_value(args.policy) if args.policy else 0,
        spec=spec,
    )
    if args.quality:
        request.quality = gateway_pb2.Quality.Value(f"QUALITY_{args.quality.upper()}")
    if args.route_threshold is not None:
        request.route.threshold = args.route_threshold
    if args.kv_budget is not None:
        request.kv_budget.max_tokens = max(args.kv_budget, 0)  # uint32; the gateway says what is wrong
        request.kv_budget.recent_share = args.kv_recent_share
    elif args.kv_recent_share:
        raise InvalidArgument("--kv-recent-share needs --kv-budget", "kv_budget")
    return request


def summary(last, n_tokens: int, elapsed: float, first: float | None, start: float) -> dict:
    from specmesh.v1 import common_pb2

    s = last.spec_stats
    return {
        "output_tokens": n_tokens,
        "prompt_tokens": last.usage.prompt_tokens,
        "seconds": elapsed,
        "tokens_per_second": n_tokens / elapsed if elapsed > 0 else 0.0,
        "time_to_first_token_s": (first - start) if first is not None else None,
        "finish_reason": common_pb2.FinishReason.Name(last.finish_reason)
        .removeprefix("FINISH_REASON_")
        .lower(),
        "seed": last.usage.seed,
        "rounds": s.rounds,
        "drafted_tokens": s.drafted_tokens,
        "accepted_tokens": s.accepted_tokens,
        "mean_accepted_length": s.mean_accepted_length,
        "acceptance_rate": s.acceptance_rate,
        "verified_path_tokens": s.verified_path_tokens,
        "path_acceptance_rate": s.path_acceptance_rate,
        "acceptance_by_depth": [
            a / r if r else 0.0 for a, r in zip(s.accepted_by_depth, s.rounds_by_depth, strict=True)
        ],
        "routed_tokens": s.routed_tokens,
        "router_calls": s.router_calls,
        "catch_up_tokens": s.catch_up_tokens,
        "session_id": last.session_id,
    }


def run(args: argparse.Namespace) -> int:
    import grpc

    from gateway.config import policy_name
    from services.core.errors import SpecmeshError
    from services.runtime.errors import status_details
    from services.runtime.security import call_metadata
    from specmesh.v1 import gateway_pb2_grpc

    try:
        request = build_request(args)
    except SpecmeshError as exc:
        print(f"specmesh generate: {exc}", file=sys.stderr)
        return 2
    text: list[str] = []
    tokens: list[int] = []
    warnings: list[str] = []
    auto = None
    last = None
    start = time.perf_counter()
    first = None
    if args.tls_ca_file:
        try:
            ca = Path(args.tls_ca_file).read_bytes()
        except OSError as exc:
            print(f"specmesh generate: --tls-ca-file {args.tls_ca_file}: {exc.strerror}", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(args.gateway, grpc.ssl_channel_credentials(root_certificates=ca))
    else:
        channel = grpc.insecure_channel(args.gateway)
    with channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            metadata = call_metadata(args.auth_token)
            chunks = stub.GenerateStream(request, timeout=args.timeout, metadata=metadata)
            for chunk in chunks:
                warnings.extend(chunk.warnings)
                if chunk.HasField("auto"):
                    auto = chunk.auto
                    if not args.json:
                        print(
                            f"specmesh generate: auto chose {policy_name(auto.policy)}: {auto.reason}",
                            file=sys.stderr,
                        )
                if not args.json:
                    for note in chunk.warnings:
                        print(f"specmesh generate: warning: {note}", file=sys.stderr)
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                tokens.extend(chunk.token_ids)
                text.append(chunk.text)
                if not args.json and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.finish_reason:
                    last = chunk
        except grpc.RpcError as exc:
            code, message, violations = status_details(exc)
            if not args.json and text:
                print()
            print(f"specmesh generate: {code.name}: {message}", file=sys.stderr)
            for v in violations:
                print(f"  field {v.field}: {v.description}", file=sys.stderr)
            if code == grpc.StatusCode.UNAVAILABLE:
                print(
                    f"  is a gateway running on {args.gateway}? start one with `specmesh up`", file=sys.stderr
                )
            return 1
        except KeyboardInterrupt:
            return 130
    elapsed = time.perf_counter() - start
    if last is None:
        print("specmesh generate: the stream ended without a final chunk", file=sys.stderr)
        return 1
    info = summary(last, len(tokens), elapsed, first, start)
    if auto is not None:
        info["auto"] = {"policy": policy_name(auto.policy), "reason": auto.reason}
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": tokens, "warnings": warnings, **info}))
        return 0
    print()
    line = f"[{info['output_tokens']} tokens in {elapsed:.2f}s: {info['tokens_per_second']:.1f} tokens/s" + (
        f", first token after {info['time_to_first_token_s'] * 1000:.0f} ms" if first is not None else ""
    )
    if info["drafted_tokens"] and info["rounds"]:
        by_depth = " ".join(f"{a:.0%}" for a in info["acceptance_by_depth"])
        line += (
            f"; tau {info['mean_accepted_length']:.2f} tokens/round, path acceptance "
            f"{info['path_acceptance_rate']:.1%} ({info['accepted_tokens']}/{info['verified_path_tokens']} "
            f"verified; by depth {by_depth}), {info['acceptance_rate']:.1%} of "
            f"{info['drafted_tokens']} drafted nodes, over {info['rounds']} rounds"
        )
    elif info["router_calls"]:
        line += (
            f"; r2r: {info['routed_tokens']} of {info['output_tokens']} tokens from the target (the router "
            f"scored {info['router_calls']} draft tokens; the target caught up on {info['catch_up_tokens']})"
        )
    elif info["drafted_tokens"]:
        line += f"; {info['drafted_tokens']} tokens drafted, none verified (draft policy)"
    line += f"; finish={info['finish_reason']}, seed={info['seed']}]"
    print(line, file=sys.stderr)
    return 0
