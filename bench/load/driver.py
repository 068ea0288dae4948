"""Closed-loop load through the gateway: N workers, each streaming one request after another."""

from __future__ import annotations

import asyncio
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


async def stream_once(stub, request, policy: str, timeout_s: float, stop_at: float) -> Stream:
    """Stream one request; cancel it when a chunk arrives after `stop_at` (not counted)."""
    import grpc

    s = Stream(policy=policy, prompt_tokens=len(request.prompt.token_ids.ids), start=time.perf_counter())
    call = stub.GenerateStream(request, timeout=timeout_s)
    try:
        async for chunk in call:
            now = time.perf_counter()
            if now >= stop_at:
                s.cut = True
                call.cancel()
                break
            if chunk.token_ids:
                s.first = s.first or now
                s.last = now
                s.tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as exc:
        s.error = exc.code().name
    s.end = time.perf_counter()
    return s


async def run_level(
    address: str,
    concurrency: int,
    duration_s: float | None,
    requests: Callable[[], tuple[object, str]],
    timeout_s: float,
    on_done: Callable[[Stream], None] = lambda s: None,
) -> tuple[list[Stream], float]:
    """`concurrency` workers stream requests (requests() -> (request, policy)) one after another
    for `duration_s`; streams still open then are cut off. duration_s None: one request per
    worker, run to its end (warm-up). Returns the streams and the level's wall time."""
    import grpc

    from specmesh.v1 import gateway_pb2_grpc

    streams: list[Stream] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        began = time.perf_counter()
        stop_at = began + duration_s if duration_s is not None else float("inf")

        async def worker() -> None:
            while True:
                request, policy = requests()
                s = await stream_once(stub, request, policy, timeout_s, stop_at)
                streams.append(s)
                on_done(s)
                if duration_s is None or time.perf_counter() >= stop_at:
                    return

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        return streams, min(elapsed, duration_s) if duration_s is not None else elapsed
