"""Policy `auto`: probe the draft, choose the request's policy (services.core.auto_policy), and
run that policy's loop. The choice and its reason go to the client on the first chunk
(``GenerateChunk.auto``) and on the request span (``specmesh.auto.*``); the request's record
then carries the chosen plan, so a resumed stream continues under the same policy.

The probe is one greedy chain Propose of PROBE_TOKENS tokens on the request's own draft session
(routed when the draft has a router, for its divergence scores): the prompt prefill it costs the
draft is work the chosen policy reuses; its few draft tokens are the probe's whole overhead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc.aio

from services.core.auto_policy import AutoSignals, choose_policy
from services.core.errors import Unavailable
from services.core.strategies import Policy
from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2

from .. import metrics as m
from ..budget import Budget, budget_to_proto
from ..config import WIRE_BY_POLICY
from ..record import RequestRecord
from ..requests import Plan, chunk_budget, plan_warnings
from .calls import replica_gone, session_call
from .context import PolicyContext
from .draft import chain_tokens
from .speculative import draft_reachable

log = logging.getLogger("specmesh.gateway")

PROBE_TOKENS = 4
QUALITY_NAMES = {
    gateway_pb2.QUALITY_UNSPECIFIED: "exact",
    gateway_pb2.QUALITY_EXACT: "exact",
    gateway_pb2.QUALITY_HIGH: "high",
    gateway_pb2.QUALITY_FAST: "fast",
}


async def auto_loop(ctx: PolicyContext, record: RequestRecord) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    from . import LOOPS  # the registry this module is part of

    plan = record.plan
    signals = await probe(ctx, record)
    policy, reason = choose_policy(signals)
    if policy is Policy.TARGET:
        ctx.release_all(record, "draft")  # the probe's session
    record.plan = chosen_plan(plan, policy, ctx)
    ctx.span.set_attributes({m.AUTO_POLICY: policy.value, m.AUTO_REASON: reason})
    log.info("auto: %s (%s)", policy.value, reason)
    first = True
    async for chunk in LOOPS[policy](ctx, record):
        if first:
            chunk.auto.CopyFrom(gateway_pb2.AutoChoice(policy=WIRE_BY_POLICY[policy], reason=reason))
            chunk.warnings.extend(plan_warnings(record.plan))
            first = False
        yield chunk


def chosen_plan(plan: Plan, policy: Policy, ctx: PolicyContext) -> Plan:
    """`plan` (validated as auto: speculative strategy and budget resolved) under `policy`."""
    wire = WIRE_BY_POLICY[policy]
    if policy in (Policy.DRAFT, Policy.R2R):
        return replace(plan, policy=wire, budget=chunk_budget(ctx.config))
    return replace(plan, policy=wire)


async def probe(ctx: PolicyContext, record: RequestRecord) -> AutoSignals:
    """The signals `choose_policy` reads; draft figures stay None when no draft answers."""
    plan = record.plan
    quality = QUALITY_NAMES[plan.quality]
    base = AutoSignals(
        quality=quality,
        prompt_tokens=len(plan.prompt_ids),
        has_draft=plan.budget is not None and draft_reachable(ctx),
        draft_routes=plan.draft_routes,
        acceptance=ctx.acceptance() if ctx.acceptance is not None else None,
    )
    if not base.has_draft:
        return base
    draft = record.upstream("draft")
    depth = max(
        1, min(PROBE_TOKENS, plan.params.max_new_tokens, record.max_context - len(plan.prompt_ids) - 1)
    )

    def make(ref: common_pb2.SessionRef) -> draft_pb2.ProposeRequest:
        return draft_pb2.ProposeRequest(
            session=ref,
            strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
            budget=budget_to_proto(Budget(max_nodes=depth, max_depth=depth)),
            sampling=common_pb2.SamplingParams(temperature=0.0),
            route=plan.draft_routes,
        )

    try:
        proposal = await session_call(ctx, "Propose", make, draft, record.sequence)
    except Unavailable:
        return replace(base, has_draft=False)
    except grpc.aio.AioRpcError as exc:
        if not replica_gone(exc):
            raise
        return replace(base, has_draft=False)
    draft.committed(proposal.session_length, [])
    tokens = chain_tokens(proposal.tree)
    logprobs = list(proposal.tree.draft_logprobs)[: len(tokens)]
    confidence = sum(math.exp(lp) for lp in logprobs) / len(logprobs) if logprobs else None
    divergence = list(proposal.divergence)
    return replace(
        base,
        confidence=confidence,
        divergence=sum(divergence) / len(divergence) if divergence else None,
    )
