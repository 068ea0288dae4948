"""Draft-side conversions and request checks: request enums/budgets -> domain, DraftTree -> TokenTree."""

from __future__ import annotations

from services.core.drafting import Budget, DraftTree, Strategy
from services.core.errors import InvalidArgument, OutOfRange
from services.core.spec import Rule
from specmesh.v1 import common_pb2, draft_pb2

STRATEGIES = {
    common_pb2.DRAFT_STRATEGY_CHAIN: Strategy.CHAIN,
    common_pb2.DRAFT_STRATEGY_STATIC_TREE: Strategy.STATIC_TREE,
    common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE: Strategy.DYNAMIC_TREE,
    common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE: Strategy.MULTI_CANDIDATE,
    common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP: Strategy.PROMPT_LOOKUP,
}
RULES = {
    Rule.GREEDY: common_pb2.ACCEPTANCE_RULE_GREEDY,
    Rule.CHAIN: common_pb2.ACCEPTANCE_RULE_CHAIN,
    Rule.TREE_IID: common_pb2.ACCEPTANCE_RULE_TREE_IID,
    Rule.TREE_WITHOUT_REPLACEMENT: common_pb2.ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT,
    Rule.SPECTR_KSEQ: common_pb2.ACCEPTANCE_RULE_SPECTR_KSEQ,
}
# Upper bounds a single Propose may ask for (a tree is verified in one target forward).
LIMITS = Budget(max_nodes=128, max_depth=32, branching=16, num_candidates=16, lookup_tokens=32)


def strategy_from_proto(value: int, default: Strategy) -> Strategy:
    if value == common_pb2.DRAFT_STRATEGY_UNSPECIFIED:
        return default
    if value not in STRATEGIES:
        raise InvalidArgument(f"unknown draft strategy {value}", "strategy")
    return STRATEGIES[value]


def budget_from_proto(pb: common_pb2.TreeBudget, strategy: Strategy) -> Budget:
    """Unset (0) fields take the strategy's defaults; the rest must be within LIMITS."""
    base = Budget.default(strategy)
    values = {}
    for name in ("max_nodes", "max_depth", "branching", "num_candidates"):
        v = getattr(pb, name)
        limit = getattr(LIMITS, name)
        if not 0 <= v <= limit:
            raise InvalidArgument(f"must be in [1, {limit}] (0 = default), got {v}", f"budget.{name}")
        values[name] = v or getattr(base, name)
    lookup = pb.lookup_tokens  # unset = 0 = none; the gateway sends its default explicitly
    if not 0 <= lookup <= LIMITS.lookup_tokens:
        raise InvalidArgument(f"must be in [0, {LIMITS.lookup_tokens}], got {lookup}", "budget.lookup_tokens")
    return Budget(**values, lookup_tokens=lookup)


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
    if request.route:
        raise InvalidArgument(
            "is not served yet: no r2r router is loaded in this draft service; leave it false", "route"
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
