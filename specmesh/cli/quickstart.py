"""`specmesh quickstart`: the main job on embedded defaults.

Builds the default model if missing, starts the target service on a loopback port, asks
it a question through the chat template over gRPC, streams the answer and reports speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="import the default model, serve it locally and answer a prompt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prompt", default="What is the capital of France?", help="user message (default: %(default)s)"
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.core.model_store import ensure_default_model

    if args.model == "smollm2-135m-instruct":
        ensure_default_model()
    return asyncio.run(_ask(args))


async def _ask(args: argparse.Namespace) -> int:
    from services.runtime.server import aio_channel
    from services.runtime.settings import ServerSettings
    from services.target.server import load_target, start_target
    from specmesh.v1 import common_pb2, target_pb2, target_pb2_grpc

    servicer = load_target(args.model)
    settings = ServerSettings(host="127.0.0.1", port=0)
    server = await start_target(servicer, settings)
    print(f"[target {servicer.engine.name} on {server.address}]", file=sys.stderr)
    print(f"user> {args.prompt}\nassistant> ", end="", flush=True)
    sampling = common_pb2.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.seed is not None:
        sampling.seed = args.seed
    request = target_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(
            chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=args.prompt)])
        ),
        sampling=sampling,
    )
    try:
        async with aio_channel(server.address, settings) as channel:
            stub = target_pb2_grpc.TargetServiceStub(channel)
            start = time.perf_counter()
            first = None
            async for chunk in stub.Generate(request):
                first = first or time.perf_counter()
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    final = chunk
        elapsed = time.perf_counter() - start
        n = final.usage.output_tokens
        print(
            f"\n[{n} tokens in {elapsed:.2f}s: {n / elapsed:.1f} tokens/s, first token after "
            f"{(first - start) * 1000:.0f} ms, prompt {final.usage.prompt_tokens} tokens, "
            f"finish={common_pb2.FinishReason.Name(final.finish_reason)}]",
            file=sys.stderr,
        )
    finally:
        await server.stop(grace=1)
        servicer.close()
    return 0
