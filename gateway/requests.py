"""Validating a GatewayGenerateRequest into a :class:`Plan` the policy loops run.

Every problem raises a ``services.core.errors`` exception naming the field, which the runtime's
exception interceptor turns into INVALID_ARGUMENT / OUT_OF_RANGE / FAILED_PRECONDITION with a
``google.rpc.BadRequest`` detail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from services.core.params import GenerationParams, KVBudget
from services.core.tokenizer import Tokenizer
from services.runtime.protocol import generation_params, kv_budget, prompt_ids
from specmesh.v1 import common_pb2, gateway_pb2

from .budget import STRATEGY_BY_WIRE, Budget, resolve_budget
from .config import POLICY_BY_WIRE, GatewayConfig, policy_name

SEED_BITS = 63  # seeds the gateway draws itself (any uint64 given by a client is accepted)


@dataclass(frozen=True)
class Plan:
    """A validated request."""

    policy: int
    model: str  # the target model's name
    prompt_ids: tuple[int, ...]
    operation: str  # "chat" or "text_completion" (gen_ai.operation.name)
    params: GenerationParams  # seed always set
    sampling: common_pb2.SamplingParams  # the request's, with the seed filled in
    strategy: int = common_pb2.DRAFT_STRATEGY_UNSPECIFIED
    budget: Budget | None = None
    adaptive: bool = False
    vocab_limit: int = 0
    route_threshold: float | None = None  # r2r: the request's threshold (None: the router's)
    quality: int = gateway_pb2.QUALITY_UNSPECIFIED
    draft_routes: bool = False  # the draft serves routed proposals (has a token router)
    kv_budget: KVBudget | None = None  # policy target: decode under this H2O budget

    @property
    def seed(self) -> int:
        assert self.params.seed is not None
        return self.params.seed


def validate(
    request: gateway_pb2.GatewayGenerateRequest,
    *,
    tokenizer: Tokenizer,
    target_info: common_pb2.ModelInfo,
    draft_info: common_pb2.ModelInfo | None,
    config: GatewayConfig,
    has_draft: bool,
) -> Plan:
    """Check a request against the served models; `draft_info` is needed for draft policies only."""
    if request.resume_from:
        raise InvalidArgument("resume_from needs the session_id of the stream to resume", "resume_from")
    if request.model and request.model != target_info.name:
        raise InvalidArgument(
            f"unknown model {request.model!r}; this gateway serves {target_info.name!r} (or leave it empty)",
            "model",
        )
    policy = request.policy or config.default_policy
    if policy not in POLICY_BY_WIRE:
        known = ", ".join(f"{gateway_pb2.Policy.Name(v)}" for v in POLICY_BY_WIRE)
        if policy in gateway_pb2.Policy.values():
            raise InvalidArgument(f"policy {policy_name(policy)} is not available yet; use {known}", "policy")
        raise InvalidArgument(f"unknown policy {policy}; use {known}", "policy")
    check_quality(request.quality, policy)
    kv = check_kv_budget(request, policy)
    # auto chooses among the policies the gateway can serve: target alone when it has no draft
    uses_draft = policy not in (gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_AUTO)
    if uses_draft and not has_draft:
        raise FailedPrecondition(
            f"policy {policy_name(policy)} needs a draft service and this gateway has none "
            "(start it with --draft ADDR); use policy target",
            "policy",
        )
    draft_routes = draft_info is not None and "route" in draft_info.features
    if policy == gateway_pb2.POLICY_R2R and draft_info is not None and not draft_routes:
        raise FailedPrecondition(
            "policy r2r needs a draft service with a token router and this gateway's draft has none "
            "(train one with `specmesh train router`, start the draft with --router DIR); use policy "
            "speculative or draft",
            "policy",
        )

    max_context = target_info.max_context
    if uses_draft and draft_info is not None and draft_info.max_context:
        max_context = min(max_context, draft_info.max_context)
    ids = prompt_ids(request.prompt, tokenizer, max_tokens=max_context)
    if len(ids) >= max_context:  # before the sampling checks: the prompt is what is too long
        raise OutOfRange(f"{len(ids)} prompt tokens fill the model context of {max_context}", "prompt")
    field = "prompt.token_ids.ids"
    ids = tokenizer.check_ids(ids, field)
    vocab = target_info.vocab_size or tokenizer.vocab_size
    for i, t in enumerate(ids):
        if t >= vocab:
            raise InvalidArgument(
                f"token id {t} at index {i} is outside the model vocabulary [0, {vocab})", field
            )
    operation = "chat" if request.prompt.WhichOneof("kind") == "chat" else "text_completion"

    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(request.sampling)
    if not sampling.HasField("seed"):
        sampling.seed = random.SystemRandom().randrange(1 << SEED_BITS)
    params = generation_params(sampling)
    params.validate(vocab_size=vocab, prompt_len=len(ids), max_context=max_context)

    plan = Plan(
        policy=policy,
        model=target_info.name,
        prompt_ids=tuple(ids),
        operation=operation,
        params=params,
        sampling=sampling,
        quality=request.quality,
        draft_routes=draft_routes,
        route_threshold=check_route(request, policy),
        kv_budget=kv,
    )
    if policy == gateway_pb2.POLICY_TARGET or (policy == gateway_pb2.POLICY_AUTO and not has_draft):
        return plan

    spec = request.spec
    vocab_limit = spec.vocab_limit
    if not 0 <= vocab_limit <= vocab:
        raise OutOfRange(
            f"must be in [0, {vocab}] (0 = full vocabulary), got {vocab_limit}", "spec.vocab_limit"
        )
    if policy in (gateway_pb2.POLICY_DRAFT, gateway_pb2.POLICY_R2R):
        return replace(plan, budget=chunk_budget(config), vocab_limit=vocab_limit)

    strategy = spec.strategy or config.default_strategy
    if strategy not in STRATEGY_BY_WIRE:
        raise InvalidArgument(
            f"unknown strategy {strategy}; use one of "
            + ", ".join(common_pb2.DraftStrategy.Name(v) for v in STRATEGY_BY_WIRE),
            "spec.strategy",
        )
    budget = resolve_budget(
        strategy,
        spec.budget if spec.HasField("budget") else None,
        defaults=config.default_budgets,
        limits=config.limits,
    )
    return replace(
        plan,
        strategy=strategy,
        budget=budget,
        adaptive=spec.adaptive or config.adaptive,
        vocab_limit=vocab_limit,
    )


def chunk_budget(config: GatewayConfig) -> Budget:
    """Policies draft and r2r: a chain of up to `draft_chunk` tokens per Propose call."""
    chunk = max(1, config.draft_chunk)
    return Budget(max_nodes=chunk, max_depth=chunk)


def check_route(request: gateway_pb2.GatewayGenerateRequest, policy: int) -> float | None:
    """The r2r threshold a request asks for (None: the router's own); `route` is refused with
    any other policy rather than ignored."""
    if not request.HasField("route"):
        return None
    if policy not in (gateway_pb2.POLICY_R2R, gateway_pb2.POLICY_AUTO):
        raise InvalidArgument(
            f"route is for policies r2r and auto, not {policy_name(policy)}; leave it unset", "route"
        )
    if not request.route.HasField("threshold"):
        return None
    threshold = request.route.threshold
    if not 0.0 <= threshold <= 1.0:  # NaN fails too
        raise InvalidArgument(f"must be in [0, 1], got {threshold}", "route.threshold")
    return threshold


def check_kv_budget(request: gateway_pb2.GatewayGenerateRequest, policy: int) -> KVBudget | None:
    """The H2O budget a request asks for: policy target only (speculative, r2r and draft
    already have their own KV rules, and a budget would make speculative output lossy), never
    with QUALITY_EXACT (evicting keys changes what the target computes)."""
    if not request.HasField("kv_budget"):
        return None
    if policy != gateway_pb2.POLICY_TARGET:
        raise InvalidArgument(
            f"kv_budget is for policy target (the target alone, decoding under an H2O budget), not "
            f"{policy_name(policy)}; leave it unset or use policy target",
            "kv_budget",
        )
    if request.quality == gateway_pb2.QUALITY_EXACT:
        raise InvalidArgument(
            "QUALITY_EXACT contradicts kv_budget: evicting keys changes the target's output; drop one",
            "kv_budget",
        )
    return kv_budget(request.kv_budget)


def check_quality(quality: int, policy: int) -> None:
    """`quality` is honoured or refused, never ignored: EXACT holds for every served policy but
    draft and r2r; HIGH and FAST are for policy auto, which chooses a policy from them."""
    if quality not in gateway_pb2.Quality.values():
        raise InvalidArgument(f"unknown quality {quality}", "quality")
    if quality in (gateway_pb2.QUALITY_HIGH, gateway_pb2.QUALITY_FAST) and policy != gateway_pb2.POLICY_AUTO:
        raise InvalidArgument(
            f"{gateway_pb2.Quality.Name(quality)} is for policy auto, which chooses a policy per "
            f"request from it; policy {policy_name(policy)} has a fixed quality (leave quality unset)",
            "quality",
        )
    if quality == gateway_pb2.QUALITY_EXACT and policy in (gateway_pb2.POLICY_DRAFT, gateway_pb2.POLICY_R2R):
        raise InvalidArgument(
            f"QUALITY_EXACT (the target's output distribution) contradicts policy {policy_name(policy)} "
            "(the small model's tokens, not the target's); use policy target or speculative",
            "quality",
        )


# Said on the first chunk of a draft-policy stream (GenerateChunk.warnings).
DRAFT_WARNING = (
    "policy draft: this text is the small draft model's alone, not the target model's (lower "
    "quality); policy speculative gives the target's output, usually faster than policy target"
)


R2R_WARNING = (
    "policy r2r: this text is the small draft model's except where its router sent a token to "
    "the target model (quality close to, not equal to, the target's); policy speculative gives "
    "the target's output exactly"
)


KV_BUDGET_WARNING = (
    "kv_budget: the target decoded keeping only {max_tokens} keys per layer and head (H2O), so "
    "this output can differ from its full-cache output; leave kv_budget unset for that"
)


def plan_warnings(plan: Plan) -> list[str]:
    """What a client should be told about a request's output."""
    warnings = {gateway_pb2.POLICY_DRAFT: DRAFT_WARNING, gateway_pb2.POLICY_R2R: R2R_WARNING}
    said = [warnings[plan.policy]] if plan.policy in warnings else []
    if plan.kv_budget is not None:
        said.append(KV_BUDGET_WARNING.format(max_tokens=plan.kv_budget.max_tokens))
    return said


# fields a resume request must leave unset: the session's record already holds them
_RESUME_UNSET = ("model", "prompt", "sampling", "policy", "quality", "spec", "kv_budget")


def check_resume(request: gateway_pb2.GatewayGenerateRequest, emitted: int | None) -> None:
    """A resume request (`session_id` set): nothing else but `resume_from`, which must not pass
    the `emitted` tokens of the session (None: the session is unknown or expired)."""
    for name in _RESUME_UNSET:
        value = getattr(request, name)
        if request.HasField(name) if hasattr(value, "ListFields") else value:
            raise InvalidArgument(
                f"a resume request (session_id set) carries only session_id and resume_from; "
                f"{name} comes from the session",
                name,
            )
    if emitted is None:
        raise NotFound(
            f"no session {request.session_id!r} (unknown, expired, or kept by a gateway that does not "
            "share this one's session store); start a new request",
            "session_id",
        )
    if request.resume_from > emitted:
        raise OutOfRange(
            f"the session has emitted {emitted} tokens; resume_from {request.resume_from} is past them",
            "resume_from",
        )
