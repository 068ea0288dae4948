"""Gateway configuration: defaults for requests that leave policy / strategy / budget unset."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.strategies import (
    ADAPTIVE_MAX_DEPTH,
    ADAPTIVE_MAX_NODES,
    DEFAULT_POLICY,
    DEFAULT_STRATEGY,
    DRAFT_CHUNK,
    LIMITS,
    Policy,
    parse_policy,
)
from specmesh.v1 import gateway_pb2

from .budget import DEFAULT_BUDGETS, WIRE_BY_STRATEGY, Budget, BudgetLimits

# wire value <-> Policy, from the names in services.core.strategies (the policies served today)
POLICY_BY_WIRE: dict[int, Policy] = {gateway_pb2.Policy.Value(p.wire): p for p in Policy}
WIRE_BY_POLICY: dict[Policy, int] = {p: v for v, p in POLICY_BY_WIRE.items()}


def policy_value(name: str) -> int:
    """Wire value of a policy name (``target``, ``draft``, ``speculative``)."""
    return WIRE_BY_POLICY[parse_policy(name)]


def policy_name(value: int) -> str:
    policy = POLICY_BY_WIRE.get(value)
    return (
        policy.value if policy is not None else gateway_pb2.Policy.Name(value).removeprefix("POLICY_").lower()
    )


@dataclass(frozen=True)
class GatewayConfig:
    # POLICY_UNSPECIFIED in a request means this policy.
    default_policy: int = WIRE_BY_POLICY[DEFAULT_POLICY]
    # DRAFT_STRATEGY_UNSPECIFIED in a request means this strategy.
    default_strategy: int = WIRE_BY_STRATEGY[DEFAULT_STRATEGY]
    # Budget fields a request leaves at 0 come from here (per strategy).
    default_budgets: dict[int, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    limits: BudgetLimits = LIMITS  # the draft service enforces the same (services.core.strategies)
    # Adapt every speculative request's budget, not only those that set spec.adaptive.
    adaptive: bool = False
    # Bounds of the adaptive budget.
    adaptive_max_depth: int = ADAPTIVE_MAX_DEPTH
    adaptive_max_nodes: int = ADAPTIVE_MAX_NODES
    # Speculative rounds draft only while the target replica serving the request holds at most
    # this many of this gateway's streams (0: always draft). Above it the round is a plain target
    # step: concurrent streams already fill the target's merged forwards, and the draft competes
    # with them for the same cores. Lossless either way (see gateway.policies.speculative).
    spec_max_streams: int = 4
    # Tokens per Propose call under the `draft` policy.
    draft_chunk: int = DRAFT_CHUNK
    # Timeout of each upstream call when the client set no deadline (None: none).
    upstream_timeout_s: float | None = 120.0
    # Longest wait for one attempt of a session call: past it the call is retried on another
    # replica (a slow or stuck one is left out of choice for a moment) while the request has time
    # left (None: an attempt may take all of the request's remaining time).
    attempt_timeout_s: float | None = None
