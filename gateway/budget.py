"""Draft strategies and tree budgets on the gateway's side of the wire: wire values, budget
resolution from a request's ``TreeBudget``, per-round caps and the adaptive budget.

Names, defaults and limits live in :mod:`services.core.strategies` (shared with the draft
service, the CLI and the benchmarks); this module maps them to the ``specmesh.v1`` enum values
the gateway works with.
"""

from __future__ import annotations

import math
from dataclasses import replace

from services.core.strategies import (
    ADAPTIVE_MAX_DEPTH,
    ADAPTIVE_MAX_NODES,
    BUDGET_FIELDS,
    parse_strategy,
)
from services.core.strategies import DEFAULT_BUDGETS as _DEFAULT_BUDGETS
from services.core.strategies import LIMITS as LIMITS
from services.core.strategies import LOOKUP_TOKENS as LOOKUP_TOKENS
from services.core.strategies import Budget as Budget
from services.core.strategies import BudgetLimits as BudgetLimits
from services.core.strategies import Strategy as Strategy
from services.core.strategies import resolve_budget as _resolve_budget
from specmesh.v1 import common_pb2

# wire value <-> Strategy, from the names in services.core.strategies
STRATEGY_BY_WIRE: dict[int, Strategy] = {common_pb2.DraftStrategy.Value(s.wire): s for s in Strategy}
WIRE_BY_STRATEGY: dict[Strategy, int] = {s: v for v, s in STRATEGY_BY_WIRE.items()}
CHAIN = WIRE_BY_STRATEGY[Strategy.CHAIN]
STATIC_TREE = WIRE_BY_STRATEGY[Strategy.STATIC_TREE]
DYNAMIC_TREE = WIRE_BY_STRATEGY[Strategy.DYNAMIC_TREE]
MULTI_CANDIDATE = WIRE_BY_STRATEGY[Strategy.MULTI_CANDIDATE]
PROMPT_LOOKUP = WIRE_BY_STRATEGY[Strategy.PROMPT_LOOKUP]

# services.core.strategies.DEFAULT_BUDGETS keyed by wire value
DEFAULT_BUDGETS: dict[int, Budget] = {WIRE_BY_STRATEGY[s]: b for s, b in _DEFAULT_BUDGETS.items()}


def strategy_value(name: str) -> int:
    """Wire value of a strategy name (``chain``, ``static-tree``, ...; ``_`` and case are accepted)."""
    return WIRE_BY_STRATEGY[parse_strategy(name, "spec.strategy")]


def strategy_name(value: int) -> str:
    """CLI spelling of a wire value (``static-tree``)."""
    strategy = STRATEGY_BY_WIRE.get(value)
    return strategy.cli if strategy is not None else f"unknown({value})"


def budget_to_proto(budget: Budget) -> common_pb2.TreeBudget:
    return common_pb2.TreeBudget(
        max_nodes=budget.max_nodes,
        max_depth=budget.max_depth,
        branching=budget.branching,
        num_candidates=budget.num_candidates,
        lookup_tokens=budget.lookup_tokens,
    )


def resolve_budget(
    strategy: int,
    requested: common_pb2.TreeBudget | None,
    *,
    defaults: dict[int, Budget] | None = None,
    limits: BudgetLimits = LIMITS,
    field: str = "spec.budget",
) -> Budget:
    """The budget of a request (services.core.strategies.resolve_budget, the same check the
    draft service makes): each field the request sets (> 0) overrides the strategy's default.

    Negative fields are INVALID_ARGUMENT, fields above `limits` OUT_OF_RANGE, both naming the field.
    """
    fields = {}
    if requested is not None:
        fields = {name: getattr(requested, name) for name in BUDGET_FIELDS}
        if requested.HasField("lookup_tokens"):
            fields["lookup_tokens"] = requested.lookup_tokens
    return _resolve_budget(
        STRATEGY_BY_WIRE[strategy],
        **fields,
        defaults={STRATEGY_BY_WIRE[k]: b for k, b in (defaults or DEFAULT_BUDGETS).items()},
        limits=limits,
        field=field,
    )


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
        max_depth: int = ADAPTIVE_MAX_DEPTH,
        max_nodes: int = ADAPTIVE_MAX_NODES,
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

    def state(self) -> dict:
        """What the budget has learned, as JSON types (for the request record)."""
        return {
            "depth": self.depth,
            "successes": self.successes,
            "failures": self.failures,
            "draft_level_s": self.draft_level_s,
            "verify_s": {str(n): s for n, s in self.verify_s.items()},
            "rounds_without_draft": self.rounds_without_draft,
        }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state` (same initial budget and bounds)."""
        self.depth = state["depth"]
        self.successes = state["successes"]
        self.failures = state["failures"]
        self.draft_level_s = state["draft_level_s"]
        self.verify_s = {int(n): s for n, s in state["verify_s"].items()}
        self.rounds_without_draft = state["rounds_without_draft"]

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
