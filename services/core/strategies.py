"""Names, default budgets and limits of draft strategies and gateway policies.

The one table the gateway, the draft service, the CLI and the benchmarks read. It imports no
torch and no protobuf (the gateway's image has no torch; ``core`` knows no wire types): each
name carries its wire spelling, the name of the protobuf enum value (``DRAFT_STRATEGY_CHAIN``,
``POLICY_TARGET``), which the servicers look up in the generated descriptors.

Spellings of a strategy: its value (``static_tree``: config files, the draft's and the
benchmarks' flags, result files), its CLI spelling (``static-tree``: the gateway's and
``specmesh generate``'s flags) and its wire name. :func:`parse_strategy` accepts the first two,
in any case.

A budget is the shape a draft may propose in one round (``TreeBudget`` on the wire):
``max_nodes`` (tree nodes drafted by the model), ``max_depth`` (tokens on the longest path),
``branching`` (children per expanded node of a static or dynamic tree), ``num_candidates`` (k
chains for SpecTr) and ``lookup_tokens`` (prompt-lookup tokens the draft merges into
model-drafted trees, on top of ``max_nodes``; see services.core.drafting.add_prompt_lookup).
:func:`resolve_budget` fills a request's unset fields from :data:`DEFAULT_BUDGETS` and checks
it against :data:`LIMITS`; the gateway and the draft service both call it, so a budget one
accepts the other accepts too.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from services.core.errors import InvalidArgument, OutOfRange


class Strategy(StrEnum):
    """How the draft proposes tokens each round."""

    CHAIN = "chain"
    STATIC_TREE = "static_tree"
    DYNAMIC_TREE = "dynamic_tree"
    MULTI_CANDIDATE = "multi_candidate"
    PROMPT_LOOKUP = "prompt_lookup"

    @property
    def cli(self) -> str:
        """The command-line spelling: ``static-tree``."""
        return self.value.replace("_", "-")

    @property
    def wire(self) -> str:
        """Name of the ``specmesh.v1.DraftStrategy`` value: ``DRAFT_STRATEGY_STATIC_TREE``."""
        return f"DRAFT_STRATEGY_{self.name}"

    @property
    def uses_model(self) -> bool:
        """False for prompt lookup, which drafts from the token history alone."""
        return self is not Strategy.PROMPT_LOOKUP


class Policy(StrEnum):
    """Which models generate a gateway request's tokens."""

    TARGET = "target"  # the large model alone (the baseline)
    DRAFT = "draft"  # the small model alone
    SPECULATIVE = "speculative"  # the draft proposes, the target verifies (lossless)
    R2R = "r2r"  # the draft generates; tokens its router flags come from the target
    AUTO = "auto"  # one of the above per request, from the requested quality and cheap signals

    @property
    def wire(self) -> str:
        """Name of the ``specmesh.v1.Policy`` value: ``POLICY_SPECULATIVE``."""
        return f"POLICY_{self.name}"

    @property
    def uses_draft(self) -> bool:
        return self is not Policy.TARGET


STRATEGY_NAMES: tuple[str, ...] = tuple(s.value for s in Strategy)  # chain, static_tree, ...
STRATEGY_CLI_NAMES: tuple[str, ...] = tuple(s.cli for s in Strategy)  # chain, static-tree, ...
POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)

DEFAULT_STRATEGY = Strategy.CHAIN  # a request (or the draft service) that names none
DEFAULT_POLICY = Policy.SPECULATIVE  # a gateway request that names none
DRAFT_CHUNK = 8  # tokens per Propose call under the draft policy


def parse_strategy(name: str, field: str = "strategy") -> Strategy:
    """The strategy a name spells (``static-tree``, ``static_tree``, ``Static-Tree``, ...)."""
    key = name.strip().lower().replace("-", "_")
    try:
        return Strategy(key)
    except ValueError:
        raise InvalidArgument(
            f"unknown strategy {name!r}; use one of {', '.join(STRATEGY_CLI_NAMES)}", field
        ) from None


# What --help shows for a strategy option: the documented (hyphen) spelling; `_` is accepted too.
STRATEGY_METAVAR = "{" + ",".join(STRATEGY_CLI_NAMES) + "}"


def strategy_arg(text: str) -> Strategy:
    """argparse ``type=`` for every strategy option of the CLI: one parser, so each command
    accepts ``dynamic-tree`` (documented) and ``dynamic_tree`` alike."""
    try:
        return parse_strategy(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_policy(name: str, field: str = "policy") -> Policy:
    key = name.strip().lower()
    try:
        return Policy(key)
    except ValueError:
        raise InvalidArgument(
            f"unknown policy {name!r}; use one of {', '.join(POLICY_NAMES)}", field
        ) from None


# --- budgets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    max_nodes: int
    max_depth: int
    branching: int = 1  # children per expanded node (static / dynamic trees)
    num_candidates: int = 1  # k for multi-candidate drafting
    lookup_tokens: int = 0  # prompt-lookup tokens merged into model trees, on top of max_nodes

    @property
    def depth(self) -> int:
        """Longest path the draft can propose under this budget."""
        return max(1, min(self.max_depth, self.max_nodes))

    @staticmethod
    def default(strategy: Strategy | str) -> Budget:
        """The strategy's default budget (:data:`DEFAULT_BUDGETS`)."""
        return DEFAULT_BUDGETS[Strategy(strategy)]


@dataclass(frozen=True)
class BudgetLimits:
    """Largest budget a request may ask for (larger values are OUT_OF_RANGE).

    ``max_nodes`` bounds the whole tree, the lookup tokens included: the target verifies it in
    one forward (its ``max_tree_nodes`` defaults to the same 256).
    """

    max_nodes: int = 256
    max_depth: int = 32
    branching: int = 16
    num_candidates: int = 16
    lookup_tokens: int = 32


LIMITS = BudgetLimits()

LOOKUP_TOKENS = 8  # default prompt-lookup tokens merged into model-drafted trees

# Defaults per strategy, used for every field a request leaves at 0 (lookup_tokens: unset).
DEFAULT_BUDGETS: Mapping[Strategy, Budget] = MappingProxyType(
    {
        Strategy.CHAIN: Budget(max_nodes=5, max_depth=5, lookup_tokens=LOOKUP_TOKENS),
        Strategy.STATIC_TREE: Budget(max_nodes=14, max_depth=3, branching=2, lookup_tokens=LOOKUP_TOKENS),
        Strategy.DYNAMIC_TREE: Budget(max_nodes=16, max_depth=6, branching=4, lookup_tokens=LOOKUP_TOKENS),
        Strategy.MULTI_CANDIDATE: Budget(
            max_nodes=12, max_depth=4, num_candidates=3, lookup_tokens=LOOKUP_TOKENS
        ),
        Strategy.PROMPT_LOOKUP: Budget(max_nodes=8, max_depth=8),
    }
)

# Bounds of the adaptive budget (the gateway's AdaptiveBudget and GatewayConfig).
ADAPTIVE_MAX_DEPTH = 12
ADAPTIVE_MAX_NODES = 64

BUDGET_FIELDS = ("max_nodes", "max_depth", "branching", "num_candidates")  # 0 = the default


def resolve_budget(
    strategy: Strategy,
    *,
    max_nodes: int = 0,
    max_depth: int = 0,
    branching: int = 0,
    num_candidates: int = 0,
    lookup_tokens: int | None = None,
    defaults: Mapping[Strategy, Budget] | None = None,
    limits: BudgetLimits = LIMITS,
    field: str = "budget",
) -> Budget:
    """The budget of a request: each field it sets (> 0; lookup_tokens: not None) overrides the
    strategy's default.

    Negative fields are INVALID_ARGUMENT, fields above `limits` OUT_OF_RANGE, both naming the
    field (``{field}.max_nodes``); so is a tree whose model nodes plus lookup tokens exceed
    ``limits.max_nodes``, and a multi-candidate budget with fewer nodes than candidates.
    """
    strategy = Strategy(strategy)
    base = (defaults or DEFAULT_BUDGETS).get(strategy) or DEFAULT_BUDGETS[strategy]
    given = {
        "max_nodes": max_nodes,
        "max_depth": max_depth,
        "branching": branching,
        "num_candidates": num_candidates,
    }
    values = {name: getattr(base, name) for name in BUDGET_FIELDS}
    for name in BUDGET_FIELDS:
        value, limit = given[name], getattr(limits, name)
        if value < 0:
            raise InvalidArgument(
                f"must be >= 0 (0 = the default {values[name]}), got {value}", f"{field}.{name}"
            )
        if value > limit:
            raise OutOfRange(f"must be <= {limit}, got {value}", f"{field}.{name}")
        if value:
            values[name] = value
    lookup = base.lookup_tokens
    if lookup_tokens is not None:
        lookup = lookup_tokens
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
    if strategy is Strategy.MULTI_CANDIDATE and budget.num_candidates > budget.max_nodes:
        raise InvalidArgument(
            f"num_candidates ({budget.num_candidates}) exceeds max_nodes ({budget.max_nodes}): "
            "each candidate needs at least one node",
            f"{field}.num_candidates",
        )
    return budget
