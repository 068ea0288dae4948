"""Drafting + verification end to end on tiny random engines.

Greedy: every strategy reproduces target-only greedy decoding token for token. The sampled
distribution tests (exact enumeration and chi-square with negative controls, on engines whose
p and q differ) are in test_losslessness.py.
"""

from __future__ import annotations

import pytest
import torch
from lossless import dense
from tiny_models import tiny_config

from services.core.drafting import (
    Budget,
    Drafter,
    DraftTree,
    Strategy,
    add_prompt_lookup,
    prompt_lookup,
    prompt_lookup_tree,
)
from services.core.engine import Engine
from services.core.params import SamplingConfig
from services.core.spec import Rule, children_of, tree_depths
from services.core.verification import verify_round

MODEL_STRATEGIES = [Strategy.CHAIN, Strategy.STATIC_TREE, Strategy.DYNAMIC_TREE, Strategy.MULTI_CANDIDATE]


def engines(vocab: int = 97) -> tuple[Engine, Engine]:
    target = Engine.from_config(tiny_config(vocab_size=vocab), seed=1, block_size=4)
    draft = Engine.from_config(tiny_config(vocab_size=vocab, num_hidden_layers=1), seed=2, block_size=4)
    return target, draft


def speculative(
    target: Engine,
    draft: Engine,
    prompt: list[int],
    n: int,
    strategy: Strategy,
    sampling: SamplingConfig,
    gen: torch.Generator,
    budget: Budget | None = None,
) -> list[int]:
    budget = budget or Budget.default(strategy)
    t_seq, d_seq = target.new_sequence(), draft.new_sequence()
    drafter = Drafter(draft)
    out: list[int] = []
    t_new = d_new = list(prompt)
    history = list(prompt)
    try:
        while len(out) < n:
            root = draft.prefill(d_seq, d_new)
            if strategy is Strategy.PROMPT_LOOKUP:
                tree = prompt_lookup_tree(history, budget, sampling)
            else:
                tree = drafter.propose(d_seq, root, strategy, budget, sampling, gen)
                if budget.lookup_tokens:
                    add_prompt_lookup(tree, history, budget.lookup_tokens)
            r = verify_round(
                target,
                t_seq,
                t_new,
                tree.tokens,
                tree.parents,
                dense(tree.dists, target.config.vocab_size),
                sampling,
                tree.rule,
                gen,
                frozenset(tree.lookup),
            )
            emitted = [tree.tokens[i] for i in r.acceptance.path] + [r.acceptance.next_token]
            out += emitted
            history += emitted
            d_new, t_new = emitted, [r.acceptance.next_token]
            assert t_seq.length == len(prompt) + len(out) - 1
    finally:
        t_seq.release()
        d_seq.release()
    return out[:n]


def greedy_reference(target: Engine, prompt: list[int], n: int) -> list[int]:
    seq = target.new_sequence()
    logits, out = target.prefill(seq, prompt), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = target.decode(seq, out[-1])
    seq.release()
    return out


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES + [Strategy.PROMPT_LOOKUP], ids=lambda s: s.value)
def test_greedy_speculative_equals_target_greedy(strategy: Strategy) -> None:
    target, draft = engines()
    prompt = [5, 17, 33, 5, 17, 60, 2, 9]
    expected = greedy_reference(target, prompt, 40)
    got = speculative(target, draft, prompt, 40, strategy, SamplingConfig(), torch.Generator().manual_seed(0))
    assert got == expected


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES, ids=lambda s: s.value)
def test_greedy_speculative_with_prompt_lookup_equals_target_greedy(strategy: Strategy) -> None:
    """Model trees with the prompt-lookup path merged in stay lossless; the repetitive prompt
    makes the lookup fire in most rounds."""
    target, draft = engines()
    prompt = [5, 17, 33, 5, 17, 60, 2, 9, 5, 17, 33, 5, 17]
    budget = Budget(max_nodes=6, max_depth=3, branching=2, num_candidates=2, lookup_tokens=6)
    expected = greedy_reference(target, prompt, 40)
    got = speculative(
        target, draft, prompt, 40, strategy, SamplingConfig(), torch.Generator().manual_seed(0), budget
    )
    assert got == expected


def test_add_prompt_lookup_shares_the_model_path() -> None:
    history = [1, 2, 3, 9, 1, 2]  # the suffix (1, 2) was followed by 3, 9, 1, 2
    tree = DraftTree(tokens=[3, 8, 4], parents=[-1, 0, -1], logprobs=[-0.1, -0.5, -2.0])
    assert add_prompt_lookup(tree, history, 4) == 3
    assert tree.tokens == [3, 8, 4, 9, 1, 2] and tree.parents == [-1, 0, -1, 0, 3, 4]
    assert tree.logprobs[3:] == [0.0, 0.0, 0.0] and tree.lookup == [3, 4, 5]  # node 0 stays drawn
    assert add_prompt_lookup(tree, history, 4) == 0  # already there: nothing new
    assert add_prompt_lookup(tree, [7, 8, 9], 4) == 0  # no earlier match
    assert add_prompt_lookup(DraftTree(), history, 2) == 2  # an empty tree gets a chain
    # a sampled tree shares nothing, even where the draft drew the lookup's token
    tree = DraftTree(tokens=[3, 8], parents=[-1, 0], logprobs=[-0.1, -0.5], rule=Rule.CHAIN)
    assert add_prompt_lookup(tree, history, 2) == 2
    assert tree.tokens == [3, 8, 3, 9] and tree.parents == [-1, 0, -1, 2] and tree.lookup == [2, 3]


def test_target_as_its_own_draft_accepts_everything_greedily() -> None:
    target, _ = engines()
    drafter = Drafter(target)
    seq, vseq = target.new_sequence(), target.new_sequence()
    root = target.prefill(seq, [1, 2, 3])
    tree = drafter.propose(seq, root, Strategy.CHAIN, Budget.default(Strategy.CHAIN), SamplingConfig(), None)
    r = verify_round(
        target, vseq, [1, 2, 3], tree.tokens, tree.parents, {}, SamplingConfig(), Rule.GREEDY, None
    )
    assert r.acceptance.path == list(range(len(tree.tokens)))


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES, ids=lambda s: s.value)
@pytest.mark.parametrize(
    "sampling", [SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.9)], ids=["greedy", "T0.8"]
)
def test_tree_shape_budget_and_distributions(strategy: Strategy, sampling: SamplingConfig) -> None:
    _, draft = engines()
    seq = draft.new_sequence()
    root = draft.prefill(seq, [3, 4, 5])
    budget = Budget(max_nodes=9, max_depth=3, branching=3, num_candidates=3)
    tree = Drafter(draft).propose(seq, root, strategy, budget, sampling, torch.Generator().manual_seed(1))
    assert seq.length == 3  # drafting leaves the committed sequence untouched
    assert 0 < len(tree.tokens) <= 9 and max(tree_depths(tree.parents)) < 3
    expected_rule = {
        Strategy.CHAIN: Rule.CHAIN,
        Strategy.STATIC_TREE: Rule.TREE_WITHOUT_REPLACEMENT,
        Strategy.DYNAMIC_TREE: Rule.TREE_WITHOUT_REPLACEMENT,
        Strategy.MULTI_CANDIDATE: Rule.SPECTR_KSEQ,
    }[strategy]
    assert tree.rule is (Rule.GREEDY if sampling.greedy else expected_rule)
    expanded = {node: kids for node, kids in children_of(tree.parents).items() if kids}
    assert set(tree.dists) == set(expanded)  # q recorded exactly where children were drawn
    for node, kids in expanded.items():
        ids, probs = tree.dists[node]
        assert abs(sum(probs) - 1) < 1e-5 and all(tree.tokens[k] in ids for k in kids)
    # Without replacement, and greedy trees (top-q children), never repeat a sibling token;
    # i.i.d. candidates (chain, SpecTr) may.
    distinct = all(len({tree.tokens[k] for k in kids}) == len(kids) for kids in expanded.values())
    assert distinct or expected_rule in (Rule.CHAIN, Rule.SPECTR_KSEQ) and not sampling.greedy
    is_chain = tree.parents == list(range(-1, len(tree.tokens) - 1))
    assert is_chain or strategy is not Strategy.CHAIN


def test_prompt_lookup_finds_the_latest_continuation() -> None:
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert prompt_lookup([4, 5, 6], 3) == []
    tree = prompt_lookup_tree(
        [1, 2, 3, 4, 1, 2], Budget(max_nodes=2, max_depth=8), SamplingConfig(temperature=1)
    )
    assert tree.tokens == [3, 4] and tree.rule is Rule.CHAIN and tree.dists[-1] == ([3], [1.0])


def test_truncated_draft_vocabulary_stays_lossless() -> None:
    target, draft = engines()
    subset = list(range(0, 97, 2))  # the draft only knows even token ids
    draft.restrict_vocab(subset)
    prompt = [5, 17, 33, 5, 17]
    for strategy in (Strategy.CHAIN, Strategy.DYNAMIC_TREE):
        got = speculative(
            target, draft, prompt, 20, strategy, SamplingConfig(), torch.Generator().manual_seed(0)
        )
        assert got == greedy_reference(target, prompt, 20)
    seq = draft.new_sequence()
    tree = Drafter(draft).propose(
        seq,
        draft.prefill(seq, prompt),
        Strategy.STATIC_TREE,
        Budget(max_nodes=8, max_depth=2, branching=4),
        SamplingConfig(temperature=1.0),
        torch.Generator().manual_seed(2),
        vocab_limit=10,
    )
    assert set(tree.tokens) <= set(subset[:10])
    assert all(set(ids) <= set(subset[:10]) for ids, _ in tree.dists.values())
