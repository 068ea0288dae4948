"""Draft proposals: chains, static trees, dynamic trees, multi-candidate (SpecTr) and
model-free prompt lookup, each recording the draft distribution q its children were drawn
from and the acceptance rule that matches the way they were drawn.

The draft samples from its own top-DRAFT_TOP_K truncation of the requested distribution.
That keeps q sparse on the wire and stays lossless: verification uses exactly this q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from services.core.engine import Engine
from services.core.kv import SequenceKV
from services.core.params import SamplingConfig
from services.core.sampling import probabilities
from services.core.spec import Rule
from services.core.strategies import Budget, Strategy  # re-exported: drafting's callers import them here

DRAFT_TOP_K = 64


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log q(token | path) per node
    # expanded node (-1 = root) -> (ids, probs): the distribution its children were drawn from
    dists: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    rule: Rule = Rule.GREEDY
    lookup: list[int] = field(default_factory=list)  # nodes proposed by prompt lookup, not drawn

    def add(self, token: int, parent: int, logprob: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.logprobs.append(logprob)
        return len(self.tokens) - 1


def rule_for(strategy: Strategy, sampling: SamplingConfig) -> Rule:
    if sampling.greedy:
        return Rule.GREEDY
    return {
        Strategy.CHAIN: Rule.CHAIN,
        Strategy.PROMPT_LOOKUP: Rule.CHAIN,
        Strategy.STATIC_TREE: Rule.TREE_WITHOUT_REPLACEMENT,
        Strategy.DYNAMIC_TREE: Rule.TREE_WITHOUT_REPLACEMENT,
        Strategy.MULTI_CANDIDATE: Rule.SPECTR_KSEQ,
    }[strategy]


def draft_distribution(
    logits: torch.Tensor, sampling: SamplingConfig, vocab_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse q = the requested distribution restricted to its top DRAFT_TOP_K, renormalised.
    Greedy drafting ranks by the T=1 distribution (q is then only used for scores).
    vocab_ids maps logits columns to token ids when the draft's vocabulary is truncated."""
    probs = probabilities(logits, SamplingConfig(temperature=1.0) if sampling.greedy else sampling)
    top = probs.topk(min(DRAFT_TOP_K, probs.shape[-1]))
    keep = top.values > 0
    cols, p = top.indices[keep], top.values[keep]
    return (cols if vocab_ids is None else vocab_ids[cols]), p / p.sum()


def draw_children(
    ids: torch.Tensor,
    q: torch.Tensor,
    count: int,
    replacement: bool,
    greedy: bool,
    gen: torch.Generator | None,
) -> list[int]:
    """Positions into ids, in draw order: the top `count` when greedy, otherwise `count` draws
    from q (i.i.d., or sequentially without replacement)."""
    if greedy:
        return list(range(min(count, len(ids))))
    if not replacement:
        count = min(count, len(ids))
    return torch.multinomial(q, count, replacement=replacement, generator=gen).tolist()


class Drafter:
    """Proposes trees from a draft model; leaves the draft sequence as it found it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._limit = 0

    def propose(
        self,
        seq: SequenceKV,
        root_logits: torch.Tensor,
        strategy: Strategy,
        budget: Budget,
        sampling: SamplingConfig,
        gen: torch.Generator | None,
        vocab_limit: int = 0,
    ) -> DraftTree:
        """vocab_limit > 0 drafts only from the first vocab_limit logits columns (the most
        frequent tokens when the engine's vocabulary is a frequency-ordered truncation)."""
        tree = DraftTree(rule=rule_for(strategy, sampling))
        self._limit = vocab_limit
        start = seq.length
        # frontier: (node, logits after it, log path probability)
        frontier = [(-1, root_logits, 0.0)]
        try:
            for depth in range(budget.max_depth):
                room = budget.max_nodes - len(tree.tokens)
                if room <= 0 or not frontier:
                    break
                added = self._expand(tree, frontier, strategy, budget, sampling, gen, depth, room)
                if not added or depth == budget.max_depth - 1 or len(tree.tokens) >= budget.max_nodes:
                    break
                logits, _ = self.engine.forward_tree(
                    seq, [tree.tokens[i] for i in added], tree.parents, tree_start=start
                )
                frontier = [(i, logits[j], self._path_logprob(tree, i)) for j, i in enumerate(added)]
        finally:
            seq.truncate(start)  # drafted KV is scratch: the next call commits what was accepted
        return tree

    def _limited(self, logits: torch.Tensor) -> torch.Tensor:
        if 0 < self._limit < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self._limit :] = float("-inf")
        return logits

    @staticmethod
    def _path_logprob(tree: DraftTree, node: int) -> float:
        total = 0.0
        while node >= 0:
            total += tree.logprobs[node]
            node = tree.parents[node]
        return total

    def _expand(self, tree, frontier, strategy, budget, sampling, gen, depth, room) -> list[int]:
        greedy = sampling.greedy
        if strategy is Strategy.DYNAMIC_TREE:
            return self._expand_dynamic(tree, frontier, budget, sampling, gen, room)
        if strategy is Strategy.CHAIN:
            per_node, replacement = 1, True
        elif strategy is Strategy.STATIC_TREE:
            per_node, replacement = budget.branching, False
        elif strategy is Strategy.MULTI_CANDIDATE:
            # k i.i.d. candidates at the root, then each candidate continues as a chain.
            per_node, replacement = (budget.num_candidates if depth == 0 else 1), True
        else:
            raise ValueError(f"{strategy} is not a model strategy")
        added = []
        for node, logits, _ in frontier:
            ids, q = draft_distribution(self._limited(logits), sampling, self.engine.vocab_ids)
            picks = draw_children(ids, q, min(per_node, room - len(added)), replacement, greedy, gen)
            if not picks:
                break
            tree.dists[node] = (ids.tolist(), q.tolist())
            for j in picks:
                added.append(tree.add(int(ids[j]), node, math.log(float(q[j]))))
            if len(added) >= room:
                break
        return added

    def _expand_dynamic(self, tree, frontier, budget, sampling, gen, room) -> list[int]:
        """Grow by path probability: every frontier node offers up to `branching` children in
        draw order; the best (path log-prob) are taken, a child only after its earlier siblings
        so each node's children remain a prefix of its draw sequence."""
        candidates = []  # (score, node, rank in draw order, token, logq)
        offered: dict[int, tuple[list[int], list[float]]] = {}
        for node, logits, path in frontier:
            ids, q = draft_distribution(self._limited(logits), sampling, self.engine.vocab_ids)
            picks = draw_children(ids, q, budget.branching, False, sampling.greedy, gen)
            offered[node] = (ids.tolist(), q.tolist())
            for rank, j in enumerate(picks):
                logq = math.log(float(q[j]))
                candidates.append((path + logq, node, rank, int(ids[j]), logq))
        width = min(room, max(budget.branching, 1) * 2)
        taken: dict[int, int] = {}  # node -> how many of its children are taken
        chosen = []
        for _score, node, rank, token, logq in sorted(candidates, key=lambda c: -c[0]):
            if len(chosen) >= width:
                break
            if rank == taken.get(node, 0):
                taken[node] = rank + 1
                chosen.append((node, rank, token, logq))
        added = []
        for node, _, token, logq in sorted(chosen, key=lambda c: (c[0], c[1])):
            tree.dists[node] = offered[node]
            added.append(tree.add(token, node, logq))
        return added


def prompt_lookup(history: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Model-free drafting: find the latest earlier occurrence of the longest suffix n-gram
    of `history` and propose the tokens that followed it."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        suffix = history[-n:]
        for i in range(len(history) - n - 1, -1, -1):
            if history[i : i + n] == suffix:
                follow = history[i + n : i + n + max_tokens]
                if follow:
                    return follow
    return []


def prompt_lookup_tree(history: list[int], budget: Budget, sampling: SamplingConfig) -> DraftTree:
    """A chain whose draft distribution is deterministic (q = one-hot on the proposed token),
    so the chain rule stays exact for sampling too."""
    tree = DraftTree(rule=rule_for(Strategy.PROMPT_LOOKUP, sampling))
    parent = -1
    for token in prompt_lookup(history, min(budget.max_nodes, budget.max_depth)):
        tree.dists[parent] = ([token], [1.0])
        parent = tree.add(token, parent, 0.0)
    return tree


def add_prompt_lookup(tree: DraftTree, history: list[int], max_tokens: int) -> int:
    """Merge the prompt-lookup continuation of `history` into a model tree as one more root
    path (greedy trees: sharing the nodes the model already drafted along it); returns the
    nodes added.

    The model and the n-gram match tend to be right on different tokens (the model on fluent
    text, the match on names, numbers and code copied from the prompt), so the union accepts
    more per verification than either. Measured through the stack on the 40 benchmark prompts
    with the H200-trained draft, greedy (`bench spec --compare-lookup`, README): the 16-node
    dynamic tree's tau 2.34 -> 2.71 (2.45 -> 2.93 on code) for 2.6 more nodes per round, the
    5-token chain's 1.90 -> 2.26.

    Lossless either way: greedy verification matches argmax along any path; sampled
    verification tries a node's lookup child (listed in tree.lookup) before its drawn children
    (services.core.spec.lookup_first_outcome). A sampled tree shares nothing: had the lookup
    token taken over a drawn child with the same token, that node would be verified by the
    drawn rule exactly when the draft's draw matched the lookup, and those draws would no
    longer follow q (a chi-square test caught the bias). New nodes carry log q = 0.
    """
    children: dict[int, dict[int, int]] = {}  # parent -> token -> node
    if tree.rule is Rule.GREEDY:
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
            children.setdefault(parent, {}).setdefault(token, node)
    node, added = -1, 0
    for token in prompt_lookup(history, max_tokens):
        child = children.get(node, {}).get(token)
        if child is None:
            child = tree.add(token, node, 0.0)
            children.setdefault(node, {})[token] = child
            tree.lookup.append(child)
            added += 1
        node = child
    return added
