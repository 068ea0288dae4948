"""Policy `target`: the large model alone, streamed from one target replica's own Generate."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
from opentelemetry import trace

from specmesh.v1 import common_pb2, gateway_pb2, target_pb2

from ..errors import UpstreamError
from ..record import RequestRecord
from ..stats import SpecCounter
from .calls import replica_gone
from .context import PolicyContext


async def target_loop(ctx: PolicyContext, record: RequestRecord) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    """Stream the target's Generate. A replica that is unavailable before the first token is
    replaced by another; once tokens flowed, an upstream failure ends the request with its status
    (the target's autoregressive stream has no round boundary to resume from)."""
    plan = record.plan
    request = target_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=plan.prompt_ids)),
        sampling=plan.sampling,
    )
    if plan.kv_budget is not None:
        request.kv_budget.max_tokens = plan.kv_budget.max_tokens
        request.kv_budget.recent_share = plan.kv_budget.recent_share
    pool = ctx.pools["target"]
    failed: list[str] = []
    while True:
        replica = await pool.choose(avoid=failed)
        replica.sessions += 1
        with trace.use_span(ctx.span, end_on_exit=False):
            # the whole stream: bounded by the client's deadline only, not by a per-call timeout
            call = replica.stub.Generate(request, timeout=ctx.deadline())
        try:
            async for response in call:
                tokens = list(response.token_ids)
                record.tokens += tokens
                if response.finish_reason:
                    # the last message: wait for the status too, so the stream ends OK rather
                    # than cancelled by the `finally` below
                    await call.code()
                    record.finish = response.finish_reason
                    # one target forward per token: tau = 1 by definition, nothing drafted
                    record.stats = SpecCounter(rounds=len(record.tokens))
                    yield gateway_pb2.GenerateChunk(
                        token_ids=tokens, text=response.text, finish_reason=response.finish_reason
                    )
                    return
                yield gateway_pb2.GenerateChunk(token_ids=tokens, text=response.text)
            raise UpstreamError("the target's Generate stream ended without a finish reason")
        except grpc.aio.AioRpcError as exc:
            if not replica_gone(exc) or record.tokens:
                raise
            pool.mark_down(replica)
            failed.append(replica.address)
            if not [r for r in pool.replicas if r.available and r.address not in failed]:
                raise
        finally:
            call.cancel()  # no-op once finished; stops the upstream stream if we are cancelled
            replica.sessions -= 1
