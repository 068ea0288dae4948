"""One verification round on the target: a single forward over the newly committed tokens
and every tree node, then the acceptance walk, then KV compaction to the accepted path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.core.engine import Engine
from services.core.errors import InvalidArgument
from services.core.kv import SequenceKV
from services.core.params import SamplingConfig
from services.core.sampling import probabilities
from services.core.spec import Acceptance, Rule, children_of, greedy_walk, validate_tree, verify

PROB_TOLERANCE = 1e-3
LOGPROB_TOLERANCE = 1e-6


@dataclass
class RoundResult:
    acceptance: Acceptance
    hidden: torch.Tensor  # [len(path) + 1, hidden]: at the root and at each accepted node


def check_draft_tree(
    tokens: list[int],
    parents: list[int],
    dists: dict[int, torch.Tensor],
    rule: Rule,
    vocab_size: int,
    max_nodes: int,
    lookup_nodes: frozenset[int] = frozenset(),
    logprobs: list[float] | None = None,
) -> None:
    """Reject trees verification could not treat losslessly, naming the field at fault.
    lookup_nodes: children proposed deterministically (prompt lookup), at most one per parent;
    the drawn-children checks skip them. logprobs: the draft's log q(token | path) per node
    (informational: acceptance uses the expanded distributions); when given, checked too."""
    if len(tokens) > max_nodes:
        raise InvalidArgument(f"{len(tokens)} nodes exceed the node budget of {max_nodes}", "tree.tokens")
    if len(parents) != len(tokens):
        raise InvalidArgument(f"{len(parents)} parents for {len(tokens)} tokens", "tree.parents")
    validate_tree(parents)
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab_size:
            raise InvalidArgument(f"token {t} of node {i} is outside [0, {vocab_size})", "tree.tokens")
    if logprobs:
        check_draft_logprobs(logprobs, len(tokens))
    bad = sorted(n for n in lookup_nodes if not 0 <= n < len(tokens))
    if bad:
        raise InvalidArgument(
            f"lookup nodes {bad} are not node indices [0, {len(tokens)})", "tree.lookup_nodes"
        )
    kids = children_of(parents)
    for node, children in kids.items():
        if sum(c in lookup_nodes for c in children) > 1:
            raise InvalidArgument(f"node {node} has more than one lookup child", "tree.lookup_nodes")
    kids = {node: [c for c in children if c not in lookup_nodes] for node, children in kids.items()}
    if rule is Rule.CHAIN and any(len(c) > 1 for c in kids.values()):
        raise InvalidArgument(
            "rule CHAIN needs a chain (at most one drawn child per node, plus a lookup child)", "rule"
        )
    if rule is Rule.GREEDY:
        return
    for node, children in kids.items():
        if not children:  # leaves, and nodes whose only child is a lookup node, need no q
            continue
        q = dists.get(node)
        if q is None:
            raise InvalidArgument(
                f"node {node} has children but no draft distribution (needed when sampling)", "tree.expanded"
            )
        child_tokens = [tokens[c] for c in children]
        if rule is Rule.TREE_WITHOUT_REPLACEMENT and len(set(child_tokens)) != len(child_tokens):
            raise InvalidArgument(
                f"node {node} repeats a child token, impossible without replacement", "tree"
            )
        zero = [t for t in child_tokens if q[t] <= 0]
        if zero:
            raise InvalidArgument(f"children {zero} of node {node} have draft probability 0", "tree.expanded")


def check_draft_logprobs(logprobs: list[float], nodes: int, field: str = "tree.draft_logprobs") -> None:
    """Draft log-probabilities: none, or one per node, each finite and <= 0 (a log-probability;
    a tolerance absorbs float32 rounding of log 1)."""
    if len(logprobs) != nodes:
        raise InvalidArgument(
            f"{len(logprobs)} log-probabilities for {nodes} nodes (send one per node or none)", field
        )
    for i, lp in enumerate(logprobs):
        if not math.isfinite(lp) or lp > LOGPROB_TOLERANCE:
            raise InvalidArgument(f"node {i} has log-probability {lp}; it must be finite and <= 0", field)


def normalise_draft_distribution(q: torch.Tensor, node: int) -> torch.Tensor:
    """Validate a draft distribution [V] (finite, non-negative, sums to 1) and renormalise."""
    if not torch.isfinite(q).all():
        raise InvalidArgument(
            f"draft distribution of node {node} has NaN or infinite values", "tree.expanded"
        )
    if (q < 0).any():
        raise InvalidArgument(f"draft distribution of node {node} has negative values", "tree.expanded")
    total = float(q.sum())
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise InvalidArgument(
            f"draft distribution of node {node} sums to {total:.6f}, not 1", "tree.expanded"
        )
    return q / total


def verify_round(
    engine: Engine,
    seq: SequenceKV,
    new_tokens: list[int],
    tree_tokens: list[int],
    tree_parents: list[int],
    draft_dists: dict[int, torch.Tensor],
    sampling: SamplingConfig,
    rule: Rule,
    gen: torch.Generator | None,
    lookup_nodes: frozenset[int] = frozenset(),
) -> RoundResult:
    """Commit new_tokens, score the tree in the same forward, accept a path and keep its KV.

    new_tokens (>= 1) become a chain after the committed prefix; tree roots hang off the
    last of them, so the target's distribution at the root comes from this same forward. The
    whole forward lands in tree scratch; the chain and the accepted path are then copied into
    the sequence, so a failed round never touches its committed blocks. A long chain (a session
    re-sent whole after a failover) first adopts the cached blocks of its prefix
    (Engine.adopt_cached: this pool's, then Redis's) and computes only the rest.
    """
    if not new_tokens:
        raise InvalidArgument(
            "needs at least one new token (the previous round's next_token)", "session.new_tokens"
        )
    start = seq.length
    new_tokens = new_tokens[engine.adopt_cached(seq, new_tokens) :]
    m = len(new_tokens)
    parents = list(range(-1, m - 1)) + [m - 1 if p < 0 else m + p for p in tree_parents]
    rows = list(range(m - 1, m + len(tree_tokens)))  # root, then every node
    try:
        logits, hidden = engine.forward_tree(seq, new_tokens + tree_tokens, parents, logit_rows=rows)
        if rule is Rule.GREEDY:  # argmax matching needs no distributions
            acc = greedy_walk(tree_tokens, tree_parents, logits.argmax(-1).tolist())
        else:
            target = probabilities(logits, sampling)  # [n + 1, V]
            acc = verify(rule, tree_tokens, tree_parents, target, draft_dists, gen, lookup_nodes)
    except BaseException:
        seq.truncate(start)  # adopted blocks included: the session commits nothing
        raise
    engine.accept_path(seq, list(range(m)) + [m + i for i in acc.path])
    return RoundResult(acc, hidden[[m - 1] + [m + i for i in acc.path]])
