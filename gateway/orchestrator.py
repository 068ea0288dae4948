"""The generation loops behind the gateway: `target`, `draft` and `speculative` policies.

Speculative round r (DESIGN.md section 2)::

    Draft.Propose(session{new_tokens: what the draft has not seen yet}, strategy, budget,
                  sampling, random{draft seed, r})                   -> tree, rule
    Target.Verify(session{new_tokens: what the target has not seen yet}, tree, sampling, rule,
                  random{seed, r})                                   -> accepted path, next_token

The target commits the new tokens and the accepted path; ``next_token`` (correction or bonus)
is committed by nobody yet: it is the target's new token of the next round, and the draft's
new tokens are the accepted path plus ``next_token``. A service that answers
FAILED_PRECONDITION (it lost or never had the session) gets the whole sequence again under a
fresh session id, once. An empty tree (prompt lookup found nothing) becomes a Target.Extend.

The draft and the target draw from independent counter-based random streams: the target's
seed is the request's seed, the draft's a sha256 derivation of it, so a sampled request is
reproducible from its seed and a retried round draws the same numbers.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace

from services.core.errors import SpecmeshError
from services.core.tokenizer import Tokenizer
from services.runtime.protocol import FINISH_TO_PROTO
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, gateway_pb2, target_pb2, target_pb2_grpc

from . import metrics as m
from .budget import AdaptiveBudget, Budget, budget_to_proto, cap_budget, strategy_name
from .config import GatewayConfig, policy_name
from .requests import Plan
from .stats import SpecCounter, tree_depth
from .stops import OutputState


class UpstreamError(SpecmeshError):
    """An upstream service answered something that breaks the protocol."""

    code = "INTERNAL"


def draft_seed(seed: int) -> int:
    """The draft's random stream seed, derived from the request seed (independent of the target's)."""
    digest = hashlib.sha256(f"specmesh-draft:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def new_session_id() -> str:
    return uuid.uuid4().hex


@dataclass
class UpstreamSession:
    """One service's copy of a request's sequence: its id, what it holds, what it has not seen."""

    service: str
    pending: list[int]
    session_id: str = field(default_factory=new_session_id)
    length: int = 0
    opened: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opened.append(self.session_id)

    def ref(self) -> common_pb2.SessionRef:
        return common_pb2.SessionRef(
            session_id=self.session_id,
            new_tokens=self.pending,
            expected_length=self.length + len(self.pending),
        )

    def committed(self, session_length: int, pending: list[int]) -> None:
        self.length = session_length
        self.pending = list(pending)

    def restart(self, sequence: list[int]) -> None:
        """Start over under a fresh id with the whole sequence as new tokens."""
        self.session_id = new_session_id()
        self.opened.append(self.session_id)
        self.length = 0
        self.pending = list(sequence)


@dataclass
class RequestResult:
    """What a finished request reports (the servicer puts it on the span and the last chunk)."""

    tokens: list[int]
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
    stats: SpecCounter = field(default_factory=SpecCounter)
    first_token_at: float | None = None


class Orchestrator:
    def __init__(
        self,
        target: target_pb2_grpc.TargetServiceStub,
        draft: draft_pb2_grpc.DraftServiceStub | None,
        *,
        tokenizer: Tokenizer,
        config: GatewayConfig,
        instruments: m.Instruments,
        release: Callable[[str, str], None],
    ) -> None:
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.config = config
        self.ins = instruments
        self._release = release  # (service, session_id) -> schedules a Release

    # -- entry point ---------------------------------------------------------------------------

    def run(
        self,
        plan: Plan,
        result: RequestResult,
        *,
        session_id: str,
        max_context: int,
        span: trace.Span,
        timeout: Callable[[], float | None],
        deadline: Callable[[], float | None] = lambda: None,
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        """Chunks of the request's output; the last one carries finish_reason; `result` is filled in.

        `timeout()` bounds each unary upstream call (the client's remaining time, else the
        configured per-call timeout); `deadline()` is the client's remaining time or None.
        """
        if plan.policy == gateway_pb2.POLICY_TARGET:
            return self._target(plan, result, span, deadline)
        if plan.policy == gateway_pb2.POLICY_DRAFT:
            return self._draft(plan, result, session_id, max_context, span, timeout)
        if plan.policy == gateway_pb2.POLICY_SPECULATIVE:
            return self._speculative(plan, result, session_id, max_context, span, timeout)
        raise UpstreamError(f"policy {policy_name(plan.policy)} has no loop", "policy")

    # -- target: plain autoregressive decoding on the target service ---------------------------

    async def _target(
        self, plan: Plan, result: RequestResult, span: trace.Span, deadline: Callable[[], float | None]
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        request = target_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=plan.prompt_ids)),
            sampling=plan.sampling,
        )
        with trace.use_span(span, end_on_exit=False):
            # the whole stream: bounded by the client's deadline only, not by a per-call timeout
            call = self.target.Generate(request, timeout=deadline())
        try:
            async for response in call:
                tokens = list(response.token_ids)
                if tokens and result.first_token_at is None:
                    result.first_token_at = time.perf_counter()
                result.tokens += tokens
                if response.finish_reason:
                    # the last message: wait for the status too, so the stream ends OK rather
                    # than cancelled by the `finally` below
                    await call.code()
                    result.finish = response.finish_reason
                    # one target forward per token: tau = 1 by definition, nothing drafted
                    result.stats = SpecCounter(rounds=len(result.tokens))
                    yield gateway_pb2.GenerateChunk(
                        token_ids=tokens, text=response.text, finish_reason=response.finish_reason
                    )
                    return
                yield gateway_pb2.GenerateChunk(token_ids=tokens, text=response.text)
            raise UpstreamError("the target's Generate stream ended without a finish reason")
        finally:
            call.cancel()  # no-op once finished; stops the upstream stream if we are cancelled

    # -- draft: the small model alone -----------------------------------------------------------

    async def _draft(
        self,
        plan: Plan,
        result: RequestResult,
        session_id: str,
        max_context: int,
        span: trace.Span,
        timeout: Callable[[], float | None],
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        assert self.draft is not None and plan.budget is not None
        out = OutputState(self.tokenizer, plan.params)
        draft = UpstreamSession("draft", list(plan.prompt_ids), session_id=session_id)
        seed = draft_seed(plan.seed)
        calls = 0
        try:
            while out.finish is None:
                sequence = [*plan.prompt_ids, *out.tokens]
                budget = cap_budget(
                    plan.budget,
                    remaining_tokens=out.remaining + 1,  # every proposed token is emitted
                    context_room=max_context - len(sequence),
                )
                budget = Budget(max_nodes=budget.depth, max_depth=budget.depth)

                def make(ref: common_pb2.SessionRef, budget=budget, calls=calls) -> draft_pb2.ProposeRequest:
                    return draft_pb2.ProposeRequest(
                        session=ref,
                        strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
                        budget=budget_to_proto(budget),
                        sampling=plan.sampling,
                        random=common_pb2.RandomStream(seed=seed, counter=calls),
                        vocab_limit=plan.vocab_limit,
                    )

                with trace.use_span(span, end_on_exit=False):
                    proposal = await self._resync_call(self.draft.Propose, make, draft, sequence, timeout)
                tokens = _chain_tokens(proposal.tree)
                if not tokens:
                    raise UpstreamError("the draft proposed no tokens for a CHAIN request")
                calls += 1
                result.stats.drafted += len(tokens)
                draft.committed(proposal.session_length, tokens)
                kept, text = out.feed(tokens)
                if kept and result.first_token_at is None:
                    result.first_token_at = time.perf_counter()
                result.tokens += kept
                yield self._chunk(kept, text, out)
        finally:
            for sid in draft.opened:
                self._release("draft", sid)
        result.finish = FINISH_TO_PROTO[out.finish]

    # -- speculative: draft proposes, target verifies -------------------------------------------

    async def _speculative(
        self,
        plan: Plan,
        result: RequestResult,
        session_id: str,
        max_context: int,
        span: trace.Span,
        timeout: Callable[[], float | None],
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        assert self.draft is not None and plan.budget is not None
        out = OutputState(self.tokenizer, plan.params)
        prompt = list(plan.prompt_ids)
        draft = UpstreamSession("draft", prompt, session_id=session_id)
        target = UpstreamSession("target", prompt, session_id=session_id)
        adaptive = (
            AdaptiveBudget(
                plan.budget,
                max_depth=self.config.adaptive_max_depth,
                max_nodes=self.config.adaptive_max_nodes,
            )
            if plan.adaptive
            else None
        )
        d_seed = draft_seed(plan.seed)
        strategy = strategy_name(plan.strategy)
        stats = result.stats
        parent = trace.set_span_in_context(span)
        try:
            while out.finish is None:
                r = stats.rounds
                sequence = [*prompt, *out.tokens]  # what both services hold after their new tokens
                wanted = adaptive.current() if adaptive else plan.budget
                budget = None  # None: the adaptive budget expects the target alone to be faster
                if wanted is not None:
                    budget = cap_budget(
                        wanted,
                        remaining_tokens=out.remaining,
                        context_room=max_context - len(sequence) - 1,  # the tree + the bonus position
                    )
                with self.ins.tracer.start_as_current_span(
                    m.ROUND_SPAN,
                    context=parent,
                    attributes={
                        m.ROUND: r,
                        m.STRATEGY: strategy,
                        m.BUDGET_NODES: budget.max_nodes if budget else 0,
                        m.BUDGET_DEPTH: budget.max_depth if budget else 0,
                    },
                ) as round_span:

                    def propose(ref: common_pb2.SessionRef, budget=budget, r=r) -> draft_pb2.ProposeRequest:
                        return draft_pb2.ProposeRequest(
                            session=ref,
                            strategy=plan.strategy,
                            budget=budget_to_proto(budget),
                            sampling=plan.sampling,
                            random=common_pb2.RandomStream(seed=d_seed, counter=r),
                            vocab_limit=plan.vocab_limit,
                        )

                    proposal = None
                    started = time.perf_counter()
                    # with one token left, the target's own next token is all there is to emit
                    if budget is not None and out.remaining > 1:
                        proposal = await self._resync_call(
                            self.draft.Propose, propose, draft, sequence, timeout
                        )
                    proposed = time.perf_counter()
                    tree = proposal.tree if proposal is not None else common_pb2.TokenTree()
                    random = common_pb2.RandomStream(seed=plan.seed, counter=r)
                    if tree.tokens:
                        rule = (
                            proposal.rule if proposal is not None else common_pb2.ACCEPTANCE_RULE_UNSPECIFIED
                        )

                        def verify(ref: common_pb2.SessionRef, tree=tree, random=random, rule=rule):
                            return target_pb2.VerifyRequest(
                                session=ref, tree=tree, sampling=plan.sampling, rule=rule, random=random
                            )

                        verdict = await self._resync_call(
                            self.target.Verify, verify, target, sequence, timeout
                        )
                        accepted = _checked_path(tree, verdict)
                        next_token = verdict.next_token
                    else:  # nothing to verify: the target just samples its next token

                        def extend(ref: common_pb2.SessionRef, random=random):
                            return target_pb2.ExtendRequest(
                                session=ref, sampling=plan.sampling, random=random
                            )

                        verdict = await self._resync_call(
                            self.target.Extend, extend, target, sequence, timeout
                        )
                        accepted = []
                        next_token = verdict.next_token
                    verified = time.perf_counter()
                    verified_tokens = len(target.pending) + len(tree.tokens)
                    target.committed(verdict.session_length, [next_token])
                    if proposal is not None:
                        draft.committed(proposal.session_length, [*accepted, next_token])
                    else:
                        draft.pending += [*accepted, next_token]
                    drafted = len(tree.tokens)
                    stats.add_round(drafted, len(accepted))
                    if adaptive is not None:
                        adaptive.update(
                            len(accepted),
                            tree_depth(list(tree.parents)),
                            draft_s=proposed - started if proposal is not None else None,
                            verify_s=verified - proposed,
                            verified_tokens=verified_tokens,
                        )
                    kept, text = out.feed([*accepted, next_token])
                    round_span.set_attributes(
                        {m.DRAFTED: drafted, m.ACCEPTED_LEN: len(accepted), m.EMITTED: len(kept)}
                    )
                self.ins.accepted_length.record(
                    len(accepted), {m.REQUEST_MODEL: plan.model, m.STRATEGY: strategy}
                )
                if kept and result.first_token_at is None:
                    result.first_token_at = time.perf_counter()
                result.tokens += kept
                yield self._chunk(kept, text, out)
        finally:
            for sid in draft.opened:
                self._release("draft", sid)
            for sid in target.opened:
                self._release("target", sid)
        result.finish = FINISH_TO_PROTO[out.finish]

    # -- helpers --------------------------------------------------------------------------------

    async def _resync_call(
        self,
        rpc: Any,
        make: Callable[[common_pb2.SessionRef], Any],
        session: UpstreamSession,
        sequence: list[int],
        timeout: Callable[[], float | None],
    ) -> Any:
        """Call `rpc(make(session.ref()))`; on FAILED_PRECONDITION resend `sequence` to a fresh session."""
        try:
            return await rpc(make(session.ref()), timeout=timeout())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        self._release(session.service, session.session_id)
        session.restart(sequence)
        return await rpc(make(session.ref()), timeout=timeout())

    @staticmethod
    def _chunk(tokens: list[int], text: str, out: OutputState) -> gateway_pb2.GenerateChunk:
        chunk = gateway_pb2.GenerateChunk(token_ids=tokens, text=text)
        if out.finish is not None:
            chunk.finish_reason = FINISH_TO_PROTO[out.finish]
        return chunk


def _chain_tokens(tree: common_pb2.TokenTree) -> list[int]:
    """Tokens of a chain-shaped tree (parents -1, 0, 1, ...); for any other shape, its first path."""
    tokens: list[int] = []
    expected_parent = -1
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=False)):
        if parent != expected_parent:
            break
        tokens.append(token)
        expected_parent = i
    return tokens


def _checked_path(tree: common_pb2.TokenTree, verdict: target_pb2.VerifyResponse) -> list[int]:
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
