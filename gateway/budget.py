"""Draft strategies, tree budgets (defaults, limits, per-round caps) and the adaptive budget.

A budget is the shape a draft may propose in one round (``TreeBudget`` on the wire):
``max_nodes`` (tree nodes in total), ``max_depth`` (tokens on the longest path), ``branching``
(children per expanded node of a static tree) and ``num_candidates`` (k chains for SpecTr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from services.core.errors import InvalidArgument, OutOfRange
from specmesh.v1 import common_pb2

CHAIN = common_pb2.DRAFT_STRATEGY_CHAIN
STATIC_TREE = common_pb2.DRAFT_STRATEGY_STATIC_TREE
DYNAMIC_TREE = common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE
MULTI_CANDIDATE = common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE
PROMPT_LOOKUP = common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP

# CLI / config spelling <-> wire enum
STRATEGY_NAMES: dict[str, int] = {
    "chain": CHAIN,
    "static-tree": STATIC_TREE,
    "dynamic-tree": DYNAMIC_TREE,
    "multi-candidate": MULTI_CANDIDATE,
    "prompt-lookup": PROMPT_LOOKUP,
}
STRATEGY_BY_VALUE: dict[int, str] = {v: k for k, v in STRATEGY_NAMES.items()}


def strategy_value(name: str) -> int:
    """Wire value of a strategy name (``chain``, ``static-tree``, ...; ``_`` and case are accepted)."""
    key = name.strip().lower().replace("_", "-")
    if key not in STRATEGY_NAMES:
        raise InvalidArgument(
            f"unknown strategy {name!r}; use one of {', '.join(STRATEGY_NAMES)}", "spec.strategy"
        )
    return STRATEGY_NAMES[key]


def strategy_name(value: int) -> str:
    return STRATEGY_BY_VALUE.get(value, f"unknown({value})")


@dataclass(frozen=True)
class Budget:
    max_nodes: int
    max_depth: int
    branching: int = 1
    num_candidates: int = 1

    def to_proto(self) -> common_pb2.TreeBudget:
        return common_pb2.TreeBudget(
            max_nodes=self.max_nodes,
            max_depth=self.max_depth,
            branching=self.branching,
            num_candidates=self.num_candidates,
        )

    @property
    def depth(self) -> int:
        """Longest path the draft can propose under this budget."""
        return max(1, min(self.max_depth, self.max_nodes))


@dataclass(frozen=True)
class BudgetLimits:
    """Largest budget a request may ask for (larger values get OUT_OF_RANGE)."""

    max_nodes: int = 256
    max_depth: int = 32
    branching: int = 16
    num_candidates: int = 16


# Defaults per strategy, used for every field a request leaves at 0.
DEFAULT_BUDGETS: dict[int, Budget] = {
    CHAIN: Budget(max_nodes=5, max_depth=5),
    STATIC_TREE: Budget(max_nodes=14, max_depth=3, branching=2),
    DYNAMIC_TREE: Budget(max_nodes=16, max_depth=6, branching=4),
    MULTI_CANDIDATE: Budget(max_nodes=12, max_depth=4, num_candidates=3),
    PROMPT_LOOKUP: Budget(max_nodes=8, max_depth=8),
}


def resolve_budget(
    strategy: int,
    requested: common_pb2.TreeBudget | None,
    *,
    defaults: dict[int, Budget] | None = None,
    limits: BudgetLimits = BudgetLimits(),
    field: str = "spec.budget",
) -> Budget:
    """The budget of a request: each field the request sets (> 0) overrides the strategy's default.

    Negative fields are INVALID_ARGUMENT, fields above `limits` OUT_OF_RANGE, both naming the field.
    """
    base = (defaults or DEFAULT_BUDGETS).get(strategy) or DEFAULT_BUDGETS[strategy]
    values = {
        "max_nodes": base.max_nodes,
        "max_depth": base.max_depth,
        "branching": base.branching,
        "num_candidates": base.num_candidates,
    }
    for name in values:
        given = getattr(requested, name) if requested is not None else 0
        limit = getattr(limits, name)
        if given < 0:
            raise InvalidArgument(
                f"must be >= 0 (0 = the default {values[name]}), got {given}", f"{field}.{name}"
            )
        if given > limit:
            raise OutOfRange(f"must be <= {limit}, got {given}", f"{field}.{name}")
        if given:
            values[name] = given
    budget = Budget(**values)
    if strategy == MULTI_CANDIDATE and budget.num_candidates > budget.max_nodes:
        raise InvalidArgument(
            f"num_candidates ({budget.num_candidates}) exceeds max_nodes ({budget.max_nodes}): "
            "each candidate needs at least one node",
            f"{field}.num_candidates",
        )
    return budget


def cap_budget(budget: Budget, *, remaining_tokens: int, context_room: int) -> Budget:
    """Shrink a round's budget to what can still be used.

    `remaining_tokens`: tokens the request may still emit (a round emits up to depth + 1, so a
    deeper tree is wasted work); `context_room`: positions the tree may take in the model context
    after the committed tokens (every tree node takes one during verification).
    """
    depth_cap = max(1, remaining_tokens - 1)
    nodes_cap = max(1, context_room)
    max_nodes = min(budget.max_nodes, nodes_cap)
    max_depth = min(budget.max_depth, depth_cap, max_nodes)
    if (max_nodes, max_depth) == (budget.max_nodes, budget.max_depth):
        return budget
    return replace(budget, max_nodes=max_nodes, max_depth=max_depth)


class AdaptiveBudget:
    """Grows or shrinks a request's tree from recent acceptance.

    Tracks an exponential moving average (EMA) of the draft tokens accepted per round. A round in
    which the whole drafted depth was accepted grows the depth by one (the draft is doing well;
    try longer); otherwise the depth falls to ``floor(EMA) + 1`` when that is lower (stop paying
    for tokens that are rarely accepted). ``max_nodes`` follows the depth with the nodes-per-depth
    ratio of the initial budget (1 for a chain, k for k candidates, the tree's width otherwise).
    """

    def __init__(
        self,
        initial: Budget,
        *,
        min_depth: int = 1,
        max_depth: int = 12,
        max_nodes: int = 64,
        smoothing: float = 0.5,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.initial = initial
        self.min_depth = max(1, min_depth)
        self.max_depth = max(self.min_depth, max_depth)
        self.max_nodes = max(1, max_nodes)
        self.smoothing = smoothing
        self.depth = min(max(initial.depth, self.min_depth), self.max_depth)
        self.nodes_per_depth = max(1.0, initial.max_nodes / initial.depth)
        self.ema: float | None = None

    def current(self) -> Budget:
        nodes = min(self.max_nodes, max(self.depth, math.ceil(self.depth * self.nodes_per_depth)))
        return replace(self.initial, max_nodes=nodes, max_depth=min(self.depth, nodes))

    def update(self, accepted: int, drafted_depth: int) -> None:
        """Record a round: `accepted` draft tokens were accepted out of a tree `drafted_depth` deep."""
        if self.ema is None:
            self.ema = float(accepted)
        else:
            self.ema = self.smoothing * self.ema + (1.0 - self.smoothing) * accepted
        if accepted >= drafted_depth:  # everything drafted was accepted
            if drafted_depth >= self.depth:  # ... and the tree was not cut short by a cap
                self.depth = min(self.depth + 1, self.max_depth)
            return
        desired = max(self.min_depth, math.floor(self.ema) + 1)
        if desired < self.depth:
            self.depth = desired
