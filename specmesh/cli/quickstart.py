"""`specmesh quickstart`: the main job on embedded defaults.

Builds what is missing (the SmolLM2 target model; a draft for it, trained briefly on CPU),
brings the local stack up as processes (Redis-compatible server, target, draft, gateway on
loopback), asks the question through the gateway twice (target alone, then speculative),
streams the speculative answer and reports tokens/s, the speedup, the mean accepted length
(tau) and the acceptance rate. Everything stops on exit.
"""

from __future__ import annotations

import argparse
import sys
import time

from services.core.strategies import STRATEGY_METAVAR, Strategy, strategy_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="build the default models, start the local stack and answer a prompt through the gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prompt", default="What is the capital of France?", help="user message (default: %(default)s)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--strategy",
        type=strategy_arg,
        default=Strategy.DYNAMIC_TREE,
        metavar=STRATEGY_METAVAR,
        help=f"draft strategy (default: {Strategy.DYNAMIC_TREE.cli})",
    )
    p.add_argument(
        "--no-adaptive",
        dest="adaptive",
        action="store_false",
        help="use the strategy's fixed default budget instead of the adaptive budget, which sizes "
        "each round from measured acceptance and costs (see README, Measured)",
    )
    p.add_argument(
        "--draft-minutes",
        type=float,
        default=5.0,
        help="CPU minutes to train the default draft when it is missing (default: %(default)s; "
        "`specmesh train draft` trains a stronger one)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from specmesh.stack import LocalStack, StackConfig, ensure_default_models
    from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    ensure_default_models(args.draft_minutes)
    strategy = common_pb2.DraftStrategy.Value(args.strategy.wire)
    sampling = common_pb2.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.seed is not None:
        sampling.seed = args.seed

    def request(policy: int) -> gateway_pb2.GatewayGenerateRequest:
        chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=args.prompt)])
        return gateway_pb2.GatewayGenerateRequest(
            prompt=common_pb2.Prompt(chat=chat),
            sampling=sampling,
            policy=policy,
            spec=gateway_pb2.SpecOptions(strategy=strategy, adaptive=args.adaptive),
        )

    with LocalStack(StackConfig(gateway_port=0)) as stack, grpc.insecure_channel(stack.gateway) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        start = time.perf_counter()
        baseline = gateway.Generate(request(gateway_pb2.POLICY_TARGET))
        target_s = time.perf_counter() - start

        print(f"\nuser> {args.prompt}\nassistant> ", end="", flush=True)
        start, first, last, ids = time.perf_counter(), None, None, []
        for chunk in gateway.GenerateStream(request(gateway_pb2.POLICY_SPECULATIVE)):
            first = first or time.perf_counter()
            print(chunk.text, end="", flush=True)
            ids += chunk.token_ids
            last = chunk
        spec_s = time.perf_counter() - start
    n, stats = last.usage.output_tokens, last.spec_stats
    if args.temperature == 0:
        same = "identical to" if ids == list(baseline.token_ids) else "DIFFERENT FROM"
    else:
        same = "sampled independently of"
    base_rate = baseline.usage.output_tokens / target_s
    label = f"{args.strategy.cli}, adaptive" if args.adaptive else args.strategy.cli
    print(
        f"\n[speculative ({label}): {n} tokens in {spec_s:.2f}s = {n / spec_s:.1f} tokens/s, "
        f"first token {1000 * (first - start):.0f} ms, tau {stats.mean_accepted_length:.2f}, "
        f"path acceptance {stats.path_acceptance_rate:.1%} ({stats.acceptance_rate:.1%} of drafted nodes) "
        f"over {stats.rounds} rounds]\n"
        f"[target alone: {baseline.usage.output_tokens} tokens in {target_s:.2f}s = {base_rate:.1f} tok/s; "
        f"speculative output {same} the target's; tokens/s ratio {n / spec_s / base_rate:.2f}x]",
        file=sys.stderr,
    )
    return 0
