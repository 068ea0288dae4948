"""Draft-side conversions and request checks: request enums/budgets -> domain, DraftTree -> TokenTree."""

from __future__ import annotations

from services.core.drafting import DraftTree
from services.core.errors import InvalidArgument, OutOfRange
from services.core.spec import Rule
from services.core.strategies import BUDGET_FIELDS, LIMITS, Budget, Strategy, resolve_budget
from specmesh.v1 import common_pb2, draft_pb2

# wire value -> Strategy, from the names in services.core.strategies
STRATEGIES = {common_pb2.DraftStrategy.Value(s.wire): s for s in Strategy}
RULES = {
    Rule.GREEDY: common_pb2.ACCEPTANCE_RULE_GREEDY,
    Rule.CHAIN: common_pb2.ACCEPTANCE_RULE_CHAIN,
    Rule.TREE_IID: common_pb2.ACCEPTANCE_RULE_TREE_IID,
    Rule.TREE_WITHOUT_REPLACEMENT: common_pb2.ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT,
    Rule.SPECTR_KSEQ: common_pb2.ACCEPTANCE_RULE_SPECTR_KSEQ,
}


def strategy_from_proto(value: int, default: Strategy) -> Strategy:
    if value == common_pb2.DRAFT_STRATEGY_UNSPECIFIED:
        return default
    if value not in STRATEGIES:
        raise InvalidArgument(f"unknown draft strategy {value}", "strategy")
    return STRATEGIES[value]


def budget_from_proto(pb: common_pb2.TreeBudget, strategy: Strategy) -> Budget:
    """Unset (0) fields, and an unset lookup_tokens, take the strategy's defaults; the rest must
    be within LIMITS (services.core.strategies.resolve_budget: the gateway's check)."""
    lookup = pb.lookup_tokens if pb.HasField("lookup_tokens") else None
    fields = {name: getattr(pb, name) for name in BUDGET_FIELDS}
    return resolve_budget(strategy, **fields, lookup_tokens=lookup, limits=LIMITS, field="budget")


def tree_to_proto(tree: DraftTree) -> common_pb2.TokenTree:
    pb = common_pb2.TokenTree(
        tokens=tree.tokens, parents=tree.parents, draft_logprobs=tree.logprobs, lookup_nodes=tree.lookup
    )
    for node, (ids, probs) in sorted(tree.dists.items()):
        pb.expanded.add(
            node=node,
            distribution=common_pb2.Distribution(sparse=common_pb2.SparseDistribution(ids=ids, probs=probs)),
        )
    return pb


def check_served_fields(request: draft_pb2.ProposeRequest) -> None:
    """Refuse request fields this service does not serve yet rather than silently ignore them
    (as vLLM and TGI answer 400 to a parameter they do not support)."""
    if request.HasField("target_hidden_states"):
        raise InvalidArgument(
            "is not served yet: this draft service drafts from tokens only (no feature-based, "
            "EAGLE-style draft is loaded); leave it unset",
            "target_hidden_states",
        )


def check_tree_room(length: int, budget: Budget, max_context: int) -> None:
    """A tree of up to max_nodes + lookup_tokens nodes must fit in the model context after the
    session's `length` committed tokens (each node takes a position when it is drafted and when
    it is verified)."""
    nodes = budget.max_nodes + budget.lookup_tokens
    if length + nodes > max_context:
        room = max(max_context - length, 0)
        raise OutOfRange(
            f"a session of {length} tokens plus a tree of up to {nodes} nodes (max_nodes "
            f"{budget.max_nodes} + lookup_tokens {budget.lookup_tokens}) exceeds the model context "
            f"of {max_context}; ask for at most {room} nodes in all",
            "budget.max_nodes",
        )
