"""Policy `r2r`: the small model generates, and the tokens its router flags go to the large one
(token routing, R2R: Fu et al., arXiv 2505.21600).

Round r::

    Draft.Propose(session{new_tokens: what the draft has not seen}, CHAIN, depth, route=true,
                  route_threshold, random{draft seed, r})   -> chain, divergence per token
    # the draft stops its chain at the first token above the threshold (the routed token)
    Target.Extend(session{new_tokens: everything the target has not seen + the kept tokens},
                  random{seed, r})                           -> the target's token  (routed only)

The kept tokens are emitted; a routed token is replaced by the target's, which first catches up
on every token it has not seen in one forward (lazily: a round with no routed token does not
call the target at all). The draft keeps its kept tokens' KV (committing them costs nothing)
and is told about the replacement as its next new token. Not lossless: the output is the
draft's except where the router sends a token to the target, which is why a request has to
ask for this policy (``quality`` EXACT refuses it).

Draft down: a round no draft replica can answer runs on the target alone (one Extend, as
under policy speculative), so the request still completes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from opentelemetry import trace

from services.core.errors import Unavailable
from services.core.route_cut import routed
from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2, target_pb2

from .. import metrics as m
from ..budget import Budget, budget_to_proto, cap_budget
from ..errors import UpstreamError
from ..record import RequestRecord, draft_seed
from .calls import replica_gone, session_call
from .context import PolicyContext, emit
from .draft import chain_tokens
from .speculative import draft_reachable


async def r2r_loop(ctx: PolicyContext, record: RequestRecord) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    plan = record.plan
    assert plan.budget is not None
    out = ctx.output(record)
    draft, target = record.upstream("draft"), record.upstream("target")
    try:
        while out.finish is None:
            depth = cap_budget(
                plan.budget,
                remaining_tokens=out.remaining + 1,  # every kept token (and a replacement) is emitted
                context_room=record.max_context - len(record.sequence) - 1,  # + the target's token
            ).depth
            chain, divergence, threshold = [], [], 0.0
            if draft_reachable(ctx):
                chain, divergence, threshold = await _propose(ctx, record, depth)
            kept = chain[: routed(divergence, threshold)]
            if chain and len(kept) == len(chain):  # nothing routed: the target need not look
                draft.committed(draft.length, kept)
                target.pending += kept
                tokens = kept
            else:  # a routed token (or no draft): the target catches up and gives it
                next_token = await _catch_up(ctx, record, kept)
                if chain:
                    draft.committed(draft.length, [*kept, next_token])
                else:  # draft down: it re-prefills what it missed when it is back
                    draft.pending += [next_token]
                tokens = [*kept, next_token]
            record.rounds += 1
            record.stats.router_calls += len(chain)
            message = emit(record, out, tokens)
            ctx.span.set_attributes(route_attributes(record))
            yield message
    finally:
        ctx.release_all(record, "draft")
        ctx.release_all(record, "target")


async def _catch_up(ctx: PolicyContext, record: RequestRecord, kept: list[int]) -> int:
    """The target's token after the sequence and `kept`: one Extend over every token the
    target has not seen yet (R2R's lazy catch-up), which it commits; its token is pending."""
    plan, target = record.plan, record.upstream("target")
    target.pending += kept
    record.stats.catch_up += len(target.pending)
    record.stats.routed += 1
    reply = await session_call(
        ctx,
        "Extend",
        lambda ref: target_pb2.ExtendRequest(
            session=ref,
            sampling=plan.sampling,
            random=common_pb2.RandomStream(seed=plan.seed, counter=record.rounds),
        ),
        target,
        [*record.sequence, *kept],
    )
    target.committed(reply.session_length, [reply.next_token])
    return reply.next_token


async def _propose(
    ctx: PolicyContext, record: RequestRecord, depth: int
) -> tuple[list[int], list[float], float]:
    """One routed Propose: the chain, its divergence per token and the threshold it was cut at.
    An empty chain when no draft replica answers (the round then runs on the target alone)."""
    plan = record.plan
    draft = record.upstream("draft")

    def make(ref: common_pb2.SessionRef) -> draft_pb2.ProposeRequest:
        request = draft_pb2.ProposeRequest(
            session=ref,
            strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
            budget=budget_to_proto(Budget(max_nodes=depth, max_depth=depth)),
            sampling=plan.sampling,
            random=common_pb2.RandomStream(seed=draft_seed(plan.seed), counter=record.rounds),
            vocab_limit=plan.vocab_limit,
            route=True,
        )
        if plan.route_threshold is not None:
            request.route_threshold = plan.route_threshold
        return request

    try:
        with trace.use_span(ctx.span, end_on_exit=False):
            proposal = await session_call(ctx, "Propose", make, draft, record.sequence)
    except Unavailable:
        return [], [], 0.0
    except grpc.aio.AioRpcError as exc:
        if not replica_gone(exc):
            raise
        return [], [], 0.0
    chain = chain_tokens(proposal.tree)
    if not chain or len(proposal.divergence) != len(chain):
        raise UpstreamError(
            f"the draft's routed proposal has {len(chain)} chain tokens and "
            f"{len(proposal.divergence)} divergence scores (expected one per token, at least one)"
        )
    # The draft now holds its session's committed tokens; the kept ones are committed next call.
    draft.committed(proposal.session_length, [])
    return chain, list(proposal.divergence), proposal.route_threshold


def route_attributes(record: RequestRecord) -> dict[str, int | float]:
    """The request's routing figures so far, as ``specmesh.route.*`` span attributes."""
    stats = record.stats
    attributes: dict[str, int | float] = {
        m.ROUTE_ROUTER_CALLS: stats.router_calls,
        m.ROUTE_TARGET_TOKENS: stats.routed,
        m.ROUTE_DRAFT_TOKENS: max(0, len(record.tokens) - stats.routed),
        m.ROUTE_CATCH_UP_TOKENS: stats.catch_up,
    }
    if record.plan.route_threshold is not None:
        attributes[m.ROUTE_THRESHOLD] = record.plan.route_threshold
    return attributes
