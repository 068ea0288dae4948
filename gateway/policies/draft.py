"""Policy `draft`: the small model alone, a chain of `draft_chunk` tokens per Propose call."""

from __future__ import annotations

from collections.abc import AsyncIterator

from opentelemetry import trace

from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2

from ..budget import Budget, budget_to_proto, cap_budget
from ..errors import UpstreamError
from ..record import RequestRecord, draft_seed
from .calls import session_call
from .context import PolicyContext, emit


async def draft_loop(ctx: PolicyContext, record: RequestRecord) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    plan = record.plan
    assert plan.budget is not None
    out = ctx.output(record)
    draft = record.upstream("draft")
    seed = draft_seed(plan.seed)
    try:
        while out.finish is None:
            sequence = record.sequence
            depth = cap_budget(
                plan.budget,
                remaining_tokens=out.remaining + 1,  # every proposed token is emitted
                context_room=record.max_context - len(sequence),
            ).depth
            budget = Budget(max_nodes=depth, max_depth=depth)

            def make(ref: common_pb2.SessionRef, budget=budget, counter=record.rounds):
                return draft_pb2.ProposeRequest(
                    session=ref,
                    strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
                    budget=budget_to_proto(budget),
                    sampling=plan.sampling,
                    random=common_pb2.RandomStream(seed=seed, counter=counter),
                    vocab_limit=plan.vocab_limit,
                )

            with trace.use_span(ctx.span, end_on_exit=False):
                proposal = await session_call(ctx, "Propose", make, draft, sequence)
            tokens = chain_tokens(proposal.tree)
            if not tokens:
                raise UpstreamError("the draft proposed no tokens for a CHAIN request")
            record.rounds += 1
            record.stats.drafted += len(tokens)
            draft.committed(proposal.session_length, tokens)
            yield emit(record, out, tokens)
    finally:
        ctx.release_all(record, "draft")


def chain_tokens(tree: common_pb2.TokenTree) -> list[int]:
    """Tokens of a chain-shaped tree (parents -1, 0, 1, ...); for any other shape, its first path."""
    tokens: list[int] = []
    expected_parent = -1
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=False)):
        if parent != expected_parent:
            break
        tokens.append(token)
        expected_parent = i
    return tokens
