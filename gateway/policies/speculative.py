"""Policy `speculative`: the draft proposes a token tree, the target verifies it (lossless).

Round r (DESIGN.md section 2)::

    Draft.Propose(session{new_tokens: what the draft has not seen yet}, strategy, budget,
                  sampling, random{draft seed, r})                   -> tree, rule
    Target.Verify(session{new_tokens: what the target has not seen yet}, tree, sampling, rule,
                  random{seed, r})                                   -> accepted path, next_token

The target commits its new tokens and the accepted path; ``next_token`` (correction or bonus)
is committed by nobody yet: it is the target's new token of the next round, and the draft's new
tokens are the accepted path plus ``next_token``. An empty tree (prompt lookup found nothing,
or the adaptive budget chose not to draft) becomes a Target.Extend. Replica choice, re-prefill
and failover are :func:`gateway.policies.calls.session_call`'s.

Draft down: a round for which no draft replica is available (or whose Propose fails with
UNAVAILABLE on every replica) runs on the target alone, as an Extend: the output is what
target-only decoding gives, the client sees no error, and the round span carries
``specmesh.spec.draft_fallback`` (the request span counts such rounds). The draft's pending
tokens keep growing, so a draft that comes back re-prefills them and drafts again.

Target busy: while the target replica serving the request holds more than
``config.spec_max_streams`` of this gateway's streams, rounds are plain target steps (Extends),
as when the adaptive budget chooses not to draft; drafting resumes when the load drops. Under
load the target's forwards already merge the concurrent streams' tokens (a merged forward of 8
decode rows cost 1.6x one row on the 2-core Xeon), while a tree to verify multiplies its rows and
the draft's forwards take the same cores. The output is unchanged: greedy rounds give the
target's greedy tokens either way, and a sampled Extend samples the target's own distribution,
as verification does (the same seed may pick other tokens at another load, as with the adaptive
budget). Each such round's span carries ``specmesh.spec.target_busy``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
from opentelemetry import trace

from services.core.errors import Unavailable
from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2, target_pb2

from .. import metrics as m
from ..budget import AdaptiveBudget, Budget, budget_to_proto, cap_budget, strategy_name
from ..errors import UpstreamError
from ..record import RequestRecord, draft_seed
from ..stats import tree_depth
from .calls import replica_gone, session_call
from .context import PolicyContext, emit

log = logging.getLogger("specmesh.gateway")


@dataclass(frozen=True)
class Round:
    """What one speculative round did."""

    tree: common_pb2.TokenTree  # what the draft proposed (empty: nothing drafted)
    accepted: list[int]  # the accepted path's tokens
    path: list[int]  # and its node indices in `tree`
    next_token: int  # the target's correction or bonus token
    draft_s: float | None  # Propose wall time (None: no Propose call)
    verify_s: float  # Verify / Extend wall time
    verified_tokens: int  # tokens the target ran its forward over


class DraftDown(Exception):
    """No draft replica could answer this round's Propose."""


def target_busy(ctx: PolicyContext, record: RequestRecord) -> bool:
    """Whether the target replica serving `record` holds more than config.spec_max_streams of
    this gateway's streams (each holds one target session there)."""
    limit = ctx.config.spec_max_streams
    session = record.upstreams.get("target")
    if not limit or session is None or session.replica is None:
        return False
    replica = ctx.pools["target"].get(session.replica)
    return replica is not None and replica.sessions > limit


def draft_reachable(ctx: PolicyContext) -> bool:
    """Whether some draft replica is available (health watch and recent calls say so)."""
    pool = ctx.pools.get("draft")
    return pool is not None and any(r.available for r in pool.replicas)


async def speculative_round(ctx: PolicyContext, record: RequestRecord, budget: Budget | None) -> Round:
    """Propose (unless `budget` is None), verify, and advance both upstream sessions. Raises
    DraftDown, having changed nothing but the draft's replica choice, when Propose fails for
    want of a draft replica."""
    plan, r = record.plan, record.rounds
    draft, target = record.upstream("draft"), record.upstream("target")
    sequence = record.sequence  # what both services hold after their pending tokens
    proposal, started = None, time.perf_counter()
    if budget is not None:
        try:
            proposal = await session_call(
                ctx,
                "Propose",
                lambda ref: draft_pb2.ProposeRequest(
                    session=ref,
                    strategy=plan.strategy,
                    budget=budget_to_proto(budget),
                    sampling=plan.sampling,
                    random=common_pb2.RandomStream(seed=draft_seed(plan.seed), counter=r),
                    vocab_limit=plan.vocab_limit,
                ),
                draft,
                sequence,
            )
        except Unavailable as exc:
            raise DraftDown(str(exc)) from exc
        except grpc.aio.AioRpcError as exc:
            if not replica_gone(exc):
                raise
            raise DraftDown(exc.details() or "draft unavailable") from exc
    proposed = time.perf_counter()
    tree = proposal.tree if proposal is not None else common_pb2.TokenTree()
    random = common_pb2.RandomStream(seed=plan.seed, counter=r)
    verified_tokens = len(target.pending) + len(tree.tokens)
    if tree.tokens:
        verdict = await session_call(
            ctx,
            "Verify",
            lambda ref: target_pb2.VerifyRequest(
                session=ref, tree=tree, sampling=plan.sampling, rule=proposal.rule, random=random
            ),
            target,
            sequence,
        )
        accepted, path = checked_path(tree, verdict), list(verdict.accepted_nodes)
    else:  # nothing to verify: the target just samples its next token
        verdict = await session_call(
            ctx,
            "Extend",
            lambda ref: target_pb2.ExtendRequest(session=ref, sampling=plan.sampling, random=random),
            target,
            sequence,
        )
        accepted, path = [], []
    verified = time.perf_counter()
    target.committed(verdict.session_length, [verdict.next_token])
    if proposal is not None:
        draft.committed(proposal.session_length, [*accepted, verdict.next_token])
    else:
        draft.pending += [*accepted, verdict.next_token]
    return Round(
        tree=tree,
        accepted=accepted,
        path=path,
        next_token=verdict.next_token,
        draft_s=proposed - started if proposal is not None else None,
        verify_s=verified - proposed,
        verified_tokens=verified_tokens,
    )


async def speculative_loop(
    ctx: PolicyContext, record: RequestRecord
) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    plan = record.plan
    assert plan.budget is not None
    out = ctx.output(record)
    adaptive = _adaptive(ctx, record)
    strategy = strategy_name(plan.strategy)
    parent = trace.set_span_in_context(ctx.span)
    fallback_rounds = 0
    try:
        while out.finish is None:
            wanted = adaptive.current() if adaptive else plan.budget
            budget = None  # None: the adaptive budget expects the target alone to be faster
            # with one token left, the target's own next token is all there is to emit
            drafting = wanted is not None and out.remaining > 1
            busy = drafting and target_busy(ctx, record)
            drafting = drafting and not busy
            fallback = drafting and not draft_reachable(ctx)  # draft down: the target alone
            if drafting and not fallback:
                budget = cap_budget(
                    wanted,
                    remaining_tokens=out.remaining,
                    context_room=record.max_context - len(record.sequence) - 1,  # tree + bonus position
                )
            attributes = {
                m.ROUND: record.rounds,
                m.STRATEGY: strategy,
                m.BUDGET_NODES: budget.max_nodes if budget else 0,
                m.BUDGET_DEPTH: budget.max_depth if budget else 0,
                m.TARGET_BUSY: busy,
            }
            with ctx.instruments.tracer.start_as_current_span(
                m.ROUND_SPAN, context=parent, attributes=attributes
            ) as round_span:
                try:
                    done = await speculative_round(ctx, record, budget)
                except DraftDown as exc:
                    log.warning(
                        "no draft replica answers (%s): round %d on the target alone", exc, record.rounds
                    )
                    fallback = True
                    done = await speculative_round(ctx, record, None)
                if fallback:
                    fallback_rounds += 1
                    round_span.set_attribute(m.DRAFT_FALLBACK, True)
                    ctx.span.set_attribute(m.DRAFT_FALLBACK_ROUNDS, fallback_rounds)
                record.rounds += 1
                record.stats.add_round(done.tree.parents, done.path)
                if adaptive is not None:
                    adaptive.update(
                        len(done.accepted),
                        tree_depth(list(done.tree.parents)),
                        draft_s=done.draft_s,
                        verify_s=done.verify_s,
                        verified_tokens=done.verified_tokens,
                    )
                    record.adaptive = adaptive.state()
                message = emit(record, out, [*done.accepted, done.next_token])
                emitted = len(message.token_ids)
                round_span.set_attributes(
                    {m.DRAFTED: len(done.tree.tokens), m.ACCEPTED_LEN: len(done.accepted), m.EMITTED: emitted}
                )
            ctx.instruments.accepted_length.record(
                len(done.accepted), {m.REQUEST_MODEL: plan.model, m.STRATEGY: strategy}
            )
            yield message
    finally:
        ctx.release_all(record, "draft")
        ctx.release_all(record, "target")


def _adaptive(ctx: PolicyContext, record: RequestRecord) -> AdaptiveBudget | None:
    """The request's adaptive budget (None when it drafts its fixed budget), restored from the record."""
    if not record.plan.adaptive:
        return None
    assert record.plan.budget is not None
    adaptive = AdaptiveBudget(
        record.plan.budget,
        max_depth=ctx.config.adaptive_max_depth,
        max_nodes=ctx.config.adaptive_max_nodes,
    )
    if record.adaptive is not None:
        adaptive.restore(record.adaptive)
    return adaptive


def checked_path(tree: common_pb2.TokenTree, verdict: target_pb2.VerifyResponse) -> list[int]:
    """The accepted tokens, after checking they form a root-to-node path of `tree`."""
    nodes, tokens = list(verdict.accepted_nodes), list(verdict.accepted_tokens)
    if len(nodes) != len(tokens):
        raise UpstreamError(f"Verify returned {len(nodes)} accepted nodes but {len(tokens)} accepted tokens")
    parent = -1
    for node, token in zip(nodes, tokens, strict=True):
        if not 0 <= node < len(tree.tokens) or tree.parents[node] != parent or tree.tokens[node] != token:
            raise UpstreamError(
                f"Verify accepted node {node} (token {token}), which does not continue the path "
                f"{nodes[: nodes.index(node)]} of the proposed tree"
            )
        parent = node
    return tokens
