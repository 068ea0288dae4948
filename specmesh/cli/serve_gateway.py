"""`specmesh serve gateway`: the public Gateway API in front of a target and a draft service.

Wire it into `specmesh serve` with ``serve_gateway.add_parser(service_subparsers)``; it also
runs alone as ``python -m specmesh.cli.serve_gateway --target ADDR --draft ADDR``. Never
imports torch (the gateway's image has none).
"""

from __future__ import annotations

import argparse
import os
import sys

from services.core.strategies import (
    BUDGET_FIELDS,
    DEFAULT_POLICY,
    DEFAULT_STRATEGY,
    DRAFT_CHUNK,
    LIMITS,
    LOOKUP_TOKENS,
    POLICY_NAMES,
    STRATEGY_METAVAR,
    strategy_arg,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_PORT = 50050
# the gateway's server settings where they differ from ServerSettings' (--help shows these)
SERVER_DEFAULTS = {"port": DEFAULT_PORT, "service_name": "specmesh-gateway"}
ENV_TARGET = "SPECMESH_TARGET_ADDRESS"
ENV_DRAFT = "SPECMESH_DRAFT_ADDRESS"
ENV_REDIS_URL = "SPECMESH_REDIS_URL"
ENV_SCORING = "SPECMESH_SCORING_ADDRESS"
ENV_IMAGE = "SPECMESH_IMAGE_ADDRESS"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET, DEFAULT_TARGET),
        metavar="ADDR[,ADDR...]",
        help="target replicas, host:port each, comma-separated; a name that resolves to several "
        "addresses (a Kubernetes headless service) stands for all of them and is re-resolved "
        "periodically. Requests go to the least-loaded healthy replica and stay there "
        f"(session affinity) until it goes away [{ENV_TARGET}, default %(default)s]",
    )
    p.add_argument(
        "--draft",
        default=os.environ.get(ENV_DRAFT),
        metavar="ADDR[,ADDR...]",
        help=f"draft replicas, as for --target; without one only the target policy works [{ENV_DRAFT}]",
    )
    p.add_argument(
        "--scoring",
        default=os.environ.get(ENV_SCORING),
        metavar="ADDR[,ADDR...]",
        help="scoring replicas (specmesh serve scoring), as for --target: the gateway then serves "
        "specmesh.v1.ScoringService (Detect, Membership, Uncertainty, Attribute) and relays each "
        "call to the replica with the fewest in flight; without one those calls are UNIMPLEMENTED "
        f"[{ENV_SCORING}]",
    )
    p.add_argument(
        "--image",
        default=os.environ.get(ENV_IMAGE),
        metavar="ADDR[,ADDR...]",
        help="image replicas (specmesh serve image), as for --target: the gateway then serves "
        "specmesh.v1.ImageService (Generate, streamed chunk by chunk) and relays each call to the "
        f"replica with the fewest in flight; without one those calls are UNIMPLEMENTED [{ENV_IMAGE}]",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get(ENV_REDIS_URL) or None,
        metavar="URL",
        help="Redis / Valkey for request records (redis://[:password@]host:port/db, rediss:// for "
        "TLS), shared by gateway replicas so that any of them resumes a stream a client reconnects "
        f"to with its session id; without one, records stay in this process [{ENV_REDIS_URL}]",
    )
    p.add_argument(
        "--model",
        "--tokenizer",
        dest="model",
        default=None,
        metavar="NAME_OR_DIR",
        help="model (name in the model directory, or HF directory) whose tokenizer the gateway uses "
        "(default: fetched from the target over gRPC, so no model directory is needed)",
    )
    d = p.add_argument_group("request defaults", "used when a request leaves the field unset")
    d.add_argument(
        "--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY.value, help="default: %(default)s"
    )
    d.add_argument(
        "--strategy",
        type=strategy_arg,
        metavar=STRATEGY_METAVAR,
        default=DEFAULT_STRATEGY,
        help=f"default: {DEFAULT_STRATEGY.cli}",
    )
    d.add_argument("--max-nodes", type=int, default=None, help="tree nodes per round (default strategy)")
    d.add_argument("--max-depth", type=int, default=None, help="draft depth per round (default strategy)")
    d.add_argument("--branching", type=int, default=None, help="children per node (static tree)")
    d.add_argument("--num-candidates", type=int, default=None, help="k candidates (multi-candidate)")
    d.add_argument(
        "--lookup-tokens",
        type=int,
        default=None,
        help="prompt-lookup tokens the draft merges into model-drafted trees, on top of the "
        f"tree's nodes (every model strategy; 0 = off; default {LOOKUP_TOKENS})",
    )
    d.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="adapt every speculative request's draft depth to the measured acceptance and draft/verify "
        "costs, down to no draft at all when the target alone is faster (default: only on request)",
    )
    d.add_argument(
        "--spec-max-streams",
        type=int,
        default=4,  # gateway.config.GatewayConfig.spec_max_streams
        metavar="N",
        help="speculative rounds draft only while the target replica holds at most N of this gateway's "
        "streams; above it they are plain target steps, which concurrent streams batch (lossless; "
        "0 = always draft; default %(default)s)",
    )
    d.add_argument(
        "--draft-chunk",
        type=int,
        default=DRAFT_CHUNK,
        help="tokens per draft call under the draft policy (default %(default)s)",
    )
    p.add_argument(
        "--attempt-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest wait for one upstream attempt; past it the call is retried on another replica "
        "while the request has time left (default: an attempt may use all of it)",
    )
    from services.runtime.settings import add_server_args

    add_server_args(p, **SERVER_DEFAULTS)
    p.set_defaults(func=run)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``gateway`` to the subcommands of ``specmesh serve``."""
    p = sub.add_parser(
        "gateway",
        help="the public Gateway API over a target and a draft service",
        description="Serve specmesh.v1.Gateway: tokenizes prompts, routes every token between the draft "
        "and the target (policies target | draft | speculative), streams the output with usage and "
        "speculative statistics. Listens on port 50050 unless --port / SPECMESH_PORT says otherwise. "
        "SIGTERM or Ctrl-C drains in-flight requests before exiting.",
    )
    _add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specmesh serve gateway", description=__doc__)
    _add_arguments(p)
    return p


def options_from_args(args: argparse.Namespace):
    """GatewayOptions from parsed flags (raises SpecmeshError / ValueError on bad values)."""
    from dataclasses import replace

    from gateway.budget import (
        DEFAULT_BUDGETS,
        STRATEGY_BY_WIRE,
        resolve_budget,
        strategy_name,
        strategy_value,
    )
    from gateway.config import GatewayConfig, policy_value
    from gateway.server import GatewayOptions
    from services.core.errors import SpecmeshError
    from services.core.model_store import resolve_model

    strategy = strategy_value(args.strategy)
    budgets = dict(DEFAULT_BUDGETS)
    limits = LIMITS
    overrides = {name: getattr(args, name) for name in BUDGET_FIELDS if getattr(args, name) is not None}
    for name, value in overrides.items():
        if not 1 <= value <= getattr(limits, name):
            raise ValueError(
                f"--{name.replace('_', '-')} must be in [1, {getattr(limits, name)}], got {value}"
            )
    budgets[strategy] = replace(budgets[strategy], **overrides)
    lookup = args.lookup_tokens
    if lookup is not None:
        if not 0 <= lookup <= limits.lookup_tokens:
            raise ValueError(f"--lookup-tokens must be in [0, {limits.lookup_tokens}], got {lookup}")
        # only the model strategies merge lookup tokens
        budgets = {
            k: replace(b, lookup_tokens=lookup) if STRATEGY_BY_WIRE[k].uses_model else b
            for k, b in budgets.items()
        }
    for key in budgets:  # the request check, on the defaults: a request that sets nothing must pass
        try:
            resolve_budget(key, None, defaults=budgets, limits=limits)
        except SpecmeshError as exc:
            raise ValueError(f"the default {strategy_name(key)} budget: {exc.message}") from None
    if args.spec_max_streams < 0:
        raise ValueError(f"--spec-max-streams must be >= 0, got {args.spec_max_streams}")
    if args.draft_chunk < 1:
        raise ValueError(f"--draft-chunk must be >= 1, got {args.draft_chunk}")
    if args.attempt_timeout is not None and not args.attempt_timeout > 0:
        raise ValueError(f"--attempt-timeout must be > 0, got {args.attempt_timeout}")
    config = GatewayConfig(
        default_policy=policy_value(args.policy),
        default_strategy=strategy,
        default_budgets=budgets,
        adaptive=args.adaptive,
        spec_max_streams=args.spec_max_streams,
        draft_chunk=args.draft_chunk,
        attempt_timeout_s=args.attempt_timeout,
    )
    # "none" (or empty) switches a role off, also over an address set in the environment
    draft, scoring, image = (
        a if a and a.lower() != "none" else None for a in (args.draft, args.scoring, args.image)
    )
    tokenizer_dir = resolve_model(args.model) if args.model else None
    return GatewayOptions(
        target=args.target,
        draft=draft,
        tokenizer_dir=tokenizer_dir,
        config=config,
        redis_url=args.redis_url,
        scoring=scoring,
        image=image,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.server import run_gateway
    from services.core.errors import SpecmeshError
    from services.runtime.settings import ServerSettings, SettingsError
    from services.runtime.telemetry import setup_telemetry

    try:
        settings = ServerSettings.from_env_and_args(args, **SERVER_DEFAULTS)
        settings.configure_logging()
        options = options_from_args(args)
    except (SpecmeshError, SettingsError, ValueError) as exc:
        print(f"specmesh serve gateway: {exc}", file=sys.stderr)
        return 2
    telemetry = setup_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    asyncio.run(run_gateway(options, settings, telemetry=telemetry))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
