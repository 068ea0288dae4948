"""Draft strategies, tree budgets (defaults, limits, per-round caps) and the adaptive budget.

A budget is the shape a draft may propose in one round (``TreeBudget`` on the wire):
``max_nodes`` (tree nodes in total), ``max_depth`` (tokens on the longest path), ``branching``
(children per expanded node of a static tree), ``num_candidates`` (k chains for SpecTr) and
``lookup_tokens`` (prompt-lookup tokens the draft merges into model-drafted trees, on top of
``max_nodes``; see services.core.drafting.add_prompt_lookup).
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
    lookup_tokens: int = 0

    def to_proto(self) -> common_pb2.TreeBudget:
        return common_pb2.TreeBudget(
            max_nodes=self.max_nodes,
            max_depth=self.max_depth,
            branching=self.branching,
            num_candidates=self.num_candidates,
            lookup_tokens=self.lookup_tokens,
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
    lookup_tokens: int = 32


LOOKUP_TOKENS = 8  # default prompt-lookup tokens merged into model-drafted trees

# Defaults per strategy, used for every field a request leaves at 0 (lookup_tokens: unset).
DEFAULT_BUDGETS: dict[int, Budget] = {
    CHAIN: Budget(max_nodes=5, max_depth=5, lookup_tokens=LOOKUP_TOKENS),
    STATIC_TREE: Budget(max_nodes=14, max_depth=3, branching=2, lookup_tokens=LOOKUP_TOKENS),
    DYNAMIC_TREE: Budget(max_nodes=16, max_depth=6, branching=4, lookup_tokens=LOOKUP_TOKENS),
    MULTI_CANDIDATE: Budget(max_nodes=12, max_depth=4, num_candidates=3, lookup_tokens=LOOKUP_TOKENS),
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
    lookup = base.lookup_tokens
    if requested is not None and requested.HasField("lookup_tokens"):
        lookup = requested.lookup_tokens
        if not 0 <= lookup <= limits.lookup_tokens:
            raise OutOfRange(
                f"must be in [0, {limits.lookup_tokens}] (0 = none; unset = the default {base.lookup_tokens})"
                f", got {lookup}",
                f"{field}.lookup_tokens",
            )
    if values["max_nodes"] + lookup > limits.max_nodes:
        raise OutOfRange(
            f"max_nodes ({values['max_nodes']}) + lookup_tokens ({lookup}) must be <= {limits.max_nodes}",
            f"{field}.lookup_tokens",
        )
    budget = Budget(**values, lookup_tokens=lookup)
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
    # the lookup path is a chain from the root, so it is as deep as it is long
    lookup_tokens = min(budget.lookup_tokens, depth_cap, nodes_cap - max_nodes)
    if (max_nodes, max_depth, lookup_tokens) == (budget.max_nodes, budget.max_depth, budget.lookup_tokens):
        return budget
    return replace(budget, max_nodes=max_nodes, max_depth=max_depth, lookup_tokens=lookup_tokens)


class AdaptiveBudget:
    """Picks each round's draft depth to maximise expected tokens per second of wall time.

    Acceptance follows a geometric model: each drafted level is accepted with probability
    ``a``, so a tree ``d`` levels deep yields ``E(d) = 1 + a + ... + a^d`` tokens per round (the
    1 is the target's own correction/bonus token). ``a`` is a discounted success ratio: a round
    that accepted ``k`` of ``d`` levels adds ``k`` successes and, if ``k < d``, one failure.

    Costs are what the gateway measured, in seconds: the draft's time per level (Propose wall
    time / depth) and the target's time by the number of tokens it verified (Verify wall time;
    Extend for a round without a draft). Unmeasured verification sizes are estimated from
    measured ones: interpolated between them, the smallest measured cost below them (optimistic,
    so smaller trees get tried) and proportionally more above them (pessimistic, so a tree only
    grows by the exploration rule). Each round takes the depth ``d`` in ``[0, max_depth]`` with the
    best ``E(d) / cost(d)``; depth 0 means no draft (the target decodes one token), which keeps
    a weak draft from making generation slower than the target alone. Exploration: a round that
    accepted every level allows one level more next round, and after ``probe_every`` rounds
    without a draft one round drafts a single level to refresh ``a``.

    ``max_nodes`` follows the depth with the nodes-per-depth ratio of the initial budget (1 for a
    chain, k for k candidates, the tree's width otherwise).
    """

    def __init__(
        self,
        initial: Budget,
        *,
        min_depth: int = 0,
        max_depth: int = 12,
        max_nodes: int = 64,
        discount: float = 0.9,
        probe_every: int = 8,
    ) -> None:
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.initial = initial
        self.min_depth = max(0, min_depth)
        self.max_depth = max(self.min_depth, 1, max_depth)
        self.max_nodes = max(1, max_nodes)
        self.discount = discount
        self.probe_every = max(1, probe_every)
        self.depth = min(max(initial.depth, self.min_depth, 1), self.max_depth)
        self.nodes_per_depth = max(1.0, initial.max_nodes / initial.depth)
        # discounted counts, with a weak prior of one success and one failure (a = 0.5)
        self.successes = 1.0
        self.failures = 1.0
        self.draft_level_s: float | None = None  # EMA of draft seconds per level
        self.verify_s: dict[int, float] = {}  # tokens verified -> EMA seconds
        self.rounds_without_draft = 0

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def nodes(self, depth: int) -> int:
        return min(self.max_nodes, max(depth, math.ceil(depth * self.nodes_per_depth)))

    def current(self) -> Budget | None:
        """This round's budget; None = do not draft (let the target decode one token)."""
        if self.depth == 0:
            return None
        nodes = self.nodes(self.depth)
        return replace(self.initial, max_nodes=nodes, max_depth=min(self.depth, nodes))

    def expected_tokens(self, depth: int) -> float:
        a = self.acceptance
        return float(sum(a**i for i in range(depth + 1)))

    def verify_cost(self, tokens: int) -> float | None:
        known = sorted(self.verify_s)
        if not known:
            return None
        below = [n for n in known if n <= tokens]
        above = [n for n in known if n >= tokens]
        if below and above:
            lo, hi = below[-1], above[0]
            if lo == hi:
                return self.verify_s[lo]
            w = (tokens - lo) / (hi - lo)
            return (1 - w) * self.verify_s[lo] + w * self.verify_s[hi]
        if above:  # smaller than anything measured
            return self.verify_s[above[0]]
        return self.verify_s[below[-1]] * tokens / below[-1]

    def round_cost(self, depth: int, new_tokens: int = 1) -> float | None:
        verify = self.verify_cost(new_tokens + (self.nodes(depth) if depth else 0))
        if verify is None or (depth and self.draft_level_s is None):
            return None
        return verify + (depth * self.draft_level_s if depth else 0.0)

    def best_depth(self) -> int:
        """The depth with the most expected tokens per second (the current one until costs are known)."""
        best, best_rate = self.depth, -1.0
        for d in range(self.min_depth, self.max_depth + 1):
            cost = self.round_cost(d)
            if cost is None or cost <= 0:
                continue
            rate = self.expected_tokens(d) / cost
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def update(
        self,
        accepted: int,
        drafted_depth: int,
        *,
        draft_s: float | None = None,
        verify_s: float | None = None,
        verified_tokens: int = 0,
    ) -> None:
        """Record a round: `accepted` levels of a tree `drafted_depth` deep (0: no draft), the wall
        seconds the draft and the target took, and how many tokens the target verified."""
        if verify_s is not None and verified_tokens > 0:
            self.verify_s[verified_tokens] = _ema(self.verify_s.get(verified_tokens), verify_s)
        if draft_s is not None and drafted_depth > 0:
            self.draft_level_s = _ema(self.draft_level_s, draft_s / drafted_depth)
        if drafted_depth == 0:
            self.rounds_without_draft += 1
            self.depth = 1 if self.rounds_without_draft >= self.probe_every else self.best_depth()
            return
        self.rounds_without_draft = 0
        self.successes = self.discount * self.successes + accepted
        self.failures = self.discount * self.failures + (1 if accepted < drafted_depth else 0)
        if accepted >= drafted_depth and drafted_depth >= self.depth:  # all accepted, not capped
            self.depth = min(self.depth + 1, self.max_depth)
            return
        self.depth = self.best_depth()


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    """Exponential moving average of measured seconds; the first measurement stands alone."""
    return new if old is None else (1.0 - weight) * old + weight * new
