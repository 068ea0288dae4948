"""Closed-loop load through the gateway: N workers, each streaming one request after another."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence

from bench.load.stats import Stream


def make_request(prompt_ids: Sequence[int], policy: str, max_new_tokens: int, seed: int):
    """A greedy GenerateStream request for `policy` (the gateway's default strategy and budget)."""
    from gateway.config import policy_value
    from specmesh.v1 import common_pb2, gateway_pb2

    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt_ids))),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=seed),
        policy=policy_value(policy),
    )


async def stream_once(stub, request, policy: str, timeout_s: float) -> Stream:
    import grpc

    s = Stream(policy=policy, prompt_tokens=len(request.prompt.token_ids.ids), start=time.perf_counter())
    try:
        async for chunk in stub.GenerateStream(request, timeout=timeout_s):
            if chunk.token_ids and s.first is None:
                s.first = time.perf_counter()
            s.tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as exc:
        s.error = exc.code().name
    s.end = time.perf_counter()
    return s


async def run_level(
    address: str,
    concurrency: int,
    duration_s: float,
    requests: Callable[[], tuple[object, str]],
    timeout_s: float,
    on_done: Callable[[Stream], None] = lambda s: None,
) -> tuple[list[Stream], float]:
    """`concurrency` workers start requests (requests() -> (request, policy)) until `duration_s`
    has passed (each at least one), then the level ends when the last one finishes. Returns the
    streams and the level's wall time."""
    import grpc

    from specmesh.v1 import gateway_pb2_grpc

    streams: list[Stream] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        began = time.perf_counter()
        stop_at = began + duration_s

        async def worker() -> None:
            for n in itertools.count():
                if n and time.perf_counter() >= stop_at:
                    return
                request, policy = requests()
                s = await stream_once(stub, request, policy, timeout_s)
                streams.append(s)
                on_done(s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return streams, time.perf_counter() - began
