"""Gateway configuration: defaults for requests that leave policy / strategy / budget unset."""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.v1 import gateway_pb2

from .budget import CHAIN, DEFAULT_BUDGETS, Budget, BudgetLimits

POLICY_NAMES: dict[str, int] = {
    "target": gateway_pb2.POLICY_TARGET,
    "draft": gateway_pb2.POLICY_DRAFT,
    "speculative": gateway_pb2.POLICY_SPECULATIVE,
}
POLICY_BY_VALUE: dict[int, str] = {v: k for k, v in POLICY_NAMES.items()}


def policy_name(value: int) -> str:
    return POLICY_BY_VALUE.get(value) or gateway_pb2.Policy.Name(value).removeprefix("POLICY_").lower()


@dataclass(frozen=True)
class GatewayConfig:
    # POLICY_UNSPECIFIED in a request means this policy.
    default_policy: int = gateway_pb2.POLICY_SPECULATIVE
    # DRAFT_STRATEGY_UNSPECIFIED in a request means this strategy.
    default_strategy: int = CHAIN
    # Budget fields a request leaves at 0 come from here (per strategy).
    default_budgets: dict[int, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    limits: BudgetLimits = BudgetLimits()
    # Adapt every speculative request's budget, not only those that set spec.adaptive.
    adaptive: bool = False
    # Bounds of the adaptive budget.
    adaptive_max_depth: int = 12
    adaptive_max_nodes: int = 64
    # Tokens per Propose call under the `draft` policy.
    draft_chunk: int = 8
    # Timeout of each upstream call when the client set no deadline (None: none).
    upstream_timeout_s: float | None = 120.0
