"""`specmesh serve <service>`: run one service as a gRPC server until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from services.core.strategies import DEFAULT_STRATEGY, STRATEGY_METAVAR, strategy_arg


def _rpcs(module, service: str) -> str:
    """The RPCs of `service`, from its proto (the help never leaves one out)."""
    return ", ".join(m.name for m in module.DESCRIPTOR.services_by_name[service].methods)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from specmesh.v1 import draft_pb2, scoring_pb2, target_pb2

    p = sub.add_parser("serve", help="run one service as a gRPC server")
    ssub = p.add_subparsers(dest="service", metavar="SERVICE", required=True)
    t = ssub.add_parser(
        "target",
        help="the target (large) model: " + _rpcs(target_pb2, "TargetService"),
        description="Serve a Llama-family model (a name in the model directory or an HF directory). "
        "SIGTERM or Ctrl-C drains in-flight calls before exiting.",
    )
    t.add_argument(
        "--model", default="smollm2-135m-instruct", help="model name or directory (default: %(default)s)"
    )
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    t.add_argument(
        "--max-kv-tokens", type=int, default=65536, help="KV cache capacity in tokens (default: %(default)s)"
    )
    t.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="skip the oneDNN-packed weight copy (saves one copy of the projection weights; "
        "verifying or drafting 3-16 tokens at once then costs up to ~2x more on CPU)",
    )
    t.add_argument(
        "--weights",
        choices=("fp32", "q4_1"),
        default=os.environ.get("SPECMESH_WEIGHTS", "fp32"),
        help="fp32: the dequantized weights; q4_1: the published 4-bit groups of a GGUF import, "
        "bf16 activations at the products (env SPECMESH_WEIGHTS; default: %(default)s)",
    )
    from services.runtime.settings import add_engine_args, add_kv_store_args, add_server_args

    add_engine_args(t)
    add_server_args(t)
    add_kv_store_args(t)
    t.set_defaults(func=run_target)

    d = ssub.add_parser(
        "draft",
        help="the draft (small) model: " + _rpcs(draft_pb2, "DraftService"),
        description="Serve a draft model that proposes token trees (chain, static tree, dynamic tree, "
        "multi-candidate, prompt lookup) for the target to verify.",
    )
    d.add_argument("--model", default="smollm2-135m-instruct-draft", help="draft model name or directory")
    d.add_argument(
        "--default-strategy",
        type=strategy_arg,
        default=DEFAULT_STRATEGY,
        metavar=STRATEGY_METAVAR,
        help=f"strategy when a request leaves it unspecified (default: {DEFAULT_STRATEGY.cli})",
    )
    d.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    d.add_argument("--max-kv-tokens", type=int, default=65536, help="KV cache capacity in tokens")
    d.add_argument(
        "--vocab-limit",
        type=int,
        default=None,
        help="draft from the first N tokens of the model's draft_vocab.json (default: all of it; "
        "0 = the full vocabulary)",
    )
    d.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="compute the draft in fp32 instead of with int8 weights (int8 is the default: "
        "about 1.6x faster per drafted token on CPU; drafting stays lossless either way, "
        "because the draft reports the distribution it drew its tokens from)",
    )
    d.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="skip the oneDNN-packed weight copy (saves one copy of the projection weights; "
        "verifying or drafting 3-16 tokens at once then costs up to ~2x more on CPU)",
    )
    r = d.add_mutually_exclusive_group()
    r.add_argument(
        "--router",
        type=Path,
        default=None,
        metavar="DIR",
        help="policy r2r's token router (router.json + router.onnx / router.safetensors from "
        "`specmesh train router`); default: the draft directory's router/ when it has one. A router "
        "that is missing or was trained for another draft stops start-up with the reason",
    )
    r.add_argument(
        "--no-router", action="store_true", help="load no router (routed proposals, policy r2r, are refused)"
    )
    add_engine_args(d)
    add_server_args(d)
    add_kv_store_args(d)
    d.set_defaults(func=run_draft)

    sc = ssub.add_parser(
        "scoring",
        help="the scoring service: " + _rpcs(scoring_pb2, "ScoringService"),
        description="Serve machine-text detection (log-likelihood, log-rank, entropy, Binoculars, "
        "Fast-DetectGPT), membership inference (Min-K%, Min-K%++, DC-PDD), token uncertainty and "
        "input attribution (ReAGent, gradient x input, random) over --model. Binoculars needs "
        "--observer, a second model sharing the tokenizer: --model is its performer, the observer "
        "weights its cross-perplexity term. PAWN, the learned detector, needs the detector "
        "`specmesh train detector` writes to <model dir>/detector/ (found there by default).",
    )
    sc.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="scored model (Binoculars' performer; default: %(default)s)",
    )
    sc.add_argument(
        "--observer",
        default=None,
        help="Binoculars' observer, same tokenizer (e.g. smollm2-135m-instruct-draft); without it "
        "BINOCULARS is unavailable",
    )
    sc.add_argument(
        "--reference",
        default=None,
        help="DC-PDD token-count table (.npy from `python -m services.scoring.reference_corpus`); "
        "default: the shipped table for the model's tokenizer, when there is one",
    )
    detector = sc.add_mutually_exclusive_group()
    detector.add_argument(
        "--detector",
        default=None,
        metavar="DIR",
        help="the learned detector (PAWN) directory; default: <model dir>/detector/ when present "
        "(a default made for other weights is skipped with a warning; a DIR given here must match)",
    )
    detector.add_argument(
        "--no-detector", dest="detector", action="store_false", help="serve no learned detector"
    )
    sc.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    sc.add_argument("--max-kv-tokens", type=int, default=65536, help="KV cache capacity in tokens")
    sc.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long a request waits for concurrent ones to share its forward (default: %(default)s)",
    )
    sc.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="skip the oneDNN-packed weight copy",
    )
    add_server_args(sc)
    sc.set_defaults(func=run_scoring)

    im = ssub.add_parser(
        "image",
        help="the image service: class-conditional digits (AR, exact SD, LANTERN, GSD), streamed",
        description="Serve the image models of `specmesh train image`: ImageService.Generate streams "
        "PNG previews of the token grid, then the final images.",
    )
    im.add_argument(
        "--model-dir", default=None, help="image model directory (default: <model root>/digits-image)"
    )
    im.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    im.add_argument("--max-kv-tokens", type=int, default=65536, help="KV cache capacity in tokens, per model")
    add_server_args(im)
    im.set_defaults(func=run_image)

    from specmesh.cli import serve_gateway

    serve_gateway.add_parser(ssub)


def _serve_model(
    args: argparse.Namespace, role: str, load, registrar, describe=None, *, share_kv: bool = False
) -> int:
    """Settings, logging and telemetry, then `load(limits)` (the servicer, on its engine thread,
    with its EngineSettings), then serve it until SIGTERM / SIGINT and close it.
    `describe(servicer)` adds to the start line. share_kv: publish and restore KV blocks
    through Redis (KVStoreSettings: --redis-url)."""
    from services.runtime.kv_store import attach_kv_store
    from services.runtime.server import run_forever
    from services.runtime.settings import EngineSettings, KVStoreSettings, ServerSettings
    from services.runtime.telemetry import setup_telemetry

    settings = ServerSettings.from_env_and_args(args)
    limits = EngineSettings.from_env_and_args(args)
    kv_settings = KVStoreSettings.from_env_and_args(args) if share_kv else KVStoreSettings()
    settings.configure_logging()
    setup_telemetry(f"specmesh-{role}", metrics_port=settings.metrics_port, metrics_host=settings.host)
    servicer = load(limits)
    kv = attach_kv_store(servicer.engine, kv_settings)
    extra = f" ({describe(servicer)})" if describe else ""

    def announce(server) -> None:
        print(f"specmesh {role} serving {servicer.engine.name}{extra} on {server.address}", flush=True)

    async def main() -> None:
        await run_forever(registrar(servicer), settings, on_start=announce)

    asyncio.run(main())
    servicer.close()
    if kv is not None:
        kv.close()
    return 0


def run_target(args: argparse.Namespace) -> int:
    from services.target.server import load_target, registrar

    return _serve_model(
        args,
        "target",
        lambda limits: load_target(
            args.model,
            threads=args.threads,
            max_kv_tokens=args.max_kv_tokens,
            pack_weights=args.pack_weights,
            weights=args.weights,
            limits=limits,
        ),
        registrar,
        share_kv=True,
    )


def run_draft(args: argparse.Namespace) -> int:
    from services.draft.server import load_draft, registrar

    return _serve_model(
        args,
        "draft",
        lambda limits: load_draft(
            args.model,
            threads=args.threads,
            default_strategy=args.default_strategy,
            max_kv_tokens=args.max_kv_tokens,
            vocab_limit=args.vocab_limit,
            pack_weights=args.pack_weights,
            int8=args.int8,
            limits=limits,
            router=None if args.no_router else (args.router or "auto"),
        ),
        registrar,
        share_kv=True,
    )


def run_scoring(args: argparse.Namespace) -> int:
    from services.scoring.server import load_scoring, registrar

    def load(limits):  # scoring batches whole texts itself (services.scoring.batcher)
        servicer = load_scoring(
            args.model,
            observer=args.observer,
            reference=args.reference,
            threads=args.threads,
            max_kv_tokens=args.max_kv_tokens,
            pack_weights=args.pack_weights,
            detector=args.detector,
        )
        servicer.batcher.window_s = args.batch_window_ms / 1000
        return servicer

    def describe(servicer) -> str:
        observer = servicer.observer.name if servicer.observer else "none"
        detector = servicer.detector.backend if servicer.detector else "none"
        return f"observer: {observer}; learned detector: {detector}"

    return _serve_model(args, "scoring", load, registrar, describe)


def run_image(args: argparse.Namespace) -> int:
    from services.image.server import load_image, registrar

    return _serve_model(
        args,
        "image",
        lambda limits: load_image(args.model_dir, threads=args.threads, max_kv_tokens=args.max_kv_tokens),
        registrar,
    )
