"""Sampled speculative decoding keeps the target's distribution, through the real code.

For every strategy the drafter offers (chain, static tree, dynamic tree, multi-candidate,
prompt lookup, and model trees with the prompt-lookup path) and for T=1, T=0.6, top-k=5 and
top-p=0.8, on tiny engines whose p and q differ by total variation >= 0.3:

1. exact enumeration: every outcome of every draw the real `Drafter.propose` makes, each
   tree's exact emission law from the real acceptance rules; the law of the first two
   emitted tokens equals the target's to 1e-9;
2. chi-square over 20,000 generations of the first two tokens through `Drafter.propose`
   and `verify_round` (tree forward, masks, KV compaction, the uniform-driven walk);
3. the issue's Monte Carlo: a depth-1 sampled dynamic tree verified by `spec.verify` 40,000
   times against one fixed target distribution.

Each test also computes its statistic for samplers known to be wrong (the draft's own
samples; a verifier that ignores temperature / top-k / top-p; a drafter that keeps the
children it drew by their value, the bug sampled dynamic trees used to have) and checks
that the statistic rejects them, so a pass means something.
"""

from __future__ import annotations

import pytest
import torch
from lossless import (
    SETTINGS,
    NextTokenLaw,
    chi_square,
    enumerate_proposals,
    mixture,
    propose_fn,
    round_law,
    sample_law,
    sample_pairs_sharp,
    sequence_law,
    sharp_engines,
    total_variation,
)

from services.core.drafting import Budget, ChildDraw, Drafter, Strategy, multinomial_draw
from services.core.params import SamplingConfig
from services.core.spec import verify

PROMPT = [1, 2, 1, 2, 1]  # repeats, so the prompt-lookup path fires
EXACT_ATOL = 1e-9
WRONG_MIN_ERROR = 1e-3  # a wrong sampler's law must be this far off somewhere

# (case id, strategy, budget): small enough to enumerate, deep enough that each strategy's
# growth rule acts (the dynamic tree's second level shares 2 slots between two parents).
CASES = [
    ("chain", Strategy.CHAIN, Budget(max_nodes=2, max_depth=2, branching=1)),
    ("static_tree", Strategy.STATIC_TREE, Budget(max_nodes=3, max_depth=2, branching=2)),
    ("dynamic_tree", Strategy.DYNAMIC_TREE, Budget(max_nodes=4, max_depth=2, branching=2)),
    ("dynamic_tree_narrow", Strategy.DYNAMIC_TREE, Budget(max_nodes=2, max_depth=1, branching=3)),
    ("multi_candidate", Strategy.MULTI_CANDIDATE, Budget(max_nodes=3, max_depth=2, num_candidates=2)),
    ("prompt_lookup", Strategy.PROMPT_LOOKUP, Budget(max_nodes=2, max_depth=2)),
    ("chain+lookup", Strategy.CHAIN, Budget(max_nodes=1, max_depth=1, branching=1, lookup_tokens=2)),
    (
        "dynamic_tree+lookup",
        Strategy.DYNAMIC_TREE,
        Budget(max_nodes=3, max_depth=2, branching=2, lookup_tokens=2),
    ),
    (
        "multi_candidate+lookup",
        Strategy.MULTI_CANDIDATE,
        Budget(max_nodes=2, max_depth=1, num_candidates=2, lookup_tokens=2),
    ),
]


@pytest.fixture(scope="module")
def engines():
    return sharp_engines()


def value_ranked(draw: ChildDraw) -> ChildDraw:
    """A wrong drafter: draws one child more than asked and drops the one the draft likes
    least, so which children survive depends on their drawn values."""

    def biased(q: torch.Tensor, count: int, replacement: bool) -> list[int]:
        picks = draw(q, min(count + 1, int((q > 0).sum())) if not replacement else count + 1, replacement)
        if len(picks) <= count:
            return picks
        worst = min(range(len(picks)), key=lambda i: float(q[picks[i]]))
        return picks[:worst] + picks[worst + 1 :]

    return biased


def max_error(law: dict, exact: dict) -> float:
    return max(abs(law.get(s, 0.0) - exact.get(s, 0.0)) for s in set(law) | set(exact))


def test_engines_disagree_substantially(engines) -> None:
    """The premise of every test here: p and q are far apart at the prompt, at every setting."""
    target, draft = engines
    for cfg in SETTINGS.values():
        p = NextTokenLaw(target, cfg)(tuple(PROMPT))
        q = NextTokenLaw(draft, cfg)(tuple(PROMPT))
        assert 0.5 * float((p - q).abs().sum()) >= 0.3


# The value-ranked drafter draws one child more at every node, which multiplies the outcomes
# to enumerate; its control runs where that stays cheap, the narrow dynamic tree (the shape
# of the original bug) among them.
RANKED_CONTROL = {"chain", "dynamic_tree_narrow", "chain+lookup", "multi_candidate+lookup"}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_law_of_two_tokens_through_the_drafter(engines, case, setting: str) -> None:
    case_id, strategy, budget = case
    target, draft = engines
    cfg = SETTINGS[setting]
    p = NextTokenLaw(target, cfg)
    exact = sequence_law(p, tuple(PROMPT), 2)

    def law_of(runs, verify_with: NextTokenLaw = p) -> dict:
        return mixture([(round_law(tree, verify_with, tuple(PROMPT), 2), w) for tree, w in runs])

    propose = propose_fn(draft, PROMPT, strategy, budget, cfg)
    runs = enumerate_proposals(propose)
    assert max_error(law_of(runs), exact) < EXACT_ATOL

    # Negative controls: the same statistic for samplers known to be wrong.
    draft_law = sequence_law(NextTokenLaw(draft, cfg), tuple(PROMPT), 2)
    assert max_error(draft_law, exact) > WRONG_MIN_ERROR, "the draft's own samples"
    if cfg != SETTINGS["T1"]:
        ignores_setting = law_of(runs, NextTokenLaw(target, SETTINGS["T1"]))
        assert max_error(ignores_setting, exact) > WRONG_MIN_ERROR, "a verifier ignoring the setting"
    if case_id in RANKED_CONTROL:
        ranked = law_of(enumerate_proposals(lambda draw: propose(value_ranked(draw))))
        assert max_error(ranked, exact) > WRONG_MIN_ERROR, "children kept by their drawn value"


# Through the services' code path at 20,000 samples each (about 90 s of one core a case, split
# over two worker processes, so three cases in all): between them the without-replacement rule
# (static and dynamic trees), K-SEQ, the lookup-first rule, and T=0.6, top-k and top-p; the
# bigram chi-square in test_spec_acceptance and the exact enumeration above cover the rest.
CHI_SQUARE = [
    ("static_tree", "top_k5"),
    ("multi_candidate+lookup", "top_p0.8"),
]
FAST_CHI_SQUARE = ("dynamic_tree+lookup", "T0.6")
SAMPLES = 20_000


def chi_square_case(engines, case_id: str, setting: str) -> None:
    _, strategy, budget = next(c for c in CASES if c[0] == case_id)
    target, draft = engines
    cfg = SETTINGS[setting]
    exact = sequence_law(NextTokenLaw(target, cfg), tuple(PROMPT), 2)
    counts = sample_pairs_sharp(PROMPT, strategy, budget, cfg, SAMPLES, seed=7)  # on sharp_engines()
    chi2, crit = chi_square(counts, exact, SAMPLES)
    tv = total_variation({s: c / SAMPLES for s, c in counts.items()}, exact)
    assert chi2 < crit, f"chi2 {chi2:.1f} >= {crit:.1f}, TV {tv:.4f}"

    wrong = {"the draft's own samples": sequence_law(NextTokenLaw(draft, cfg), tuple(PROMPT), 2)}
    if cfg != SETTINGS["T1"]:
        wrong["a verifier ignoring the setting"] = sequence_law(
            NextTokenLaw(target, SETTINGS["T1"]), tuple(PROMPT), 2
        )
    for name, law in wrong.items():
        bad, _ = chi_square(sample_law(law, SAMPLES, seed=8), exact, SAMPLES)
        assert bad > crit, f"{name}: chi2 {bad:.1f} should exceed {crit:.1f}"


def test_two_tokens_chi_square_through_verify_round_fast(engines) -> None:
    chi_square_case(engines, *FAST_CHI_SQUARE)


@pytest.mark.slow
@pytest.mark.parametrize("case_id,setting", CHI_SQUARE, ids=[f"{c}-{s}" for c, s in CHI_SQUARE])
def test_two_tokens_chi_square_through_verify_round(engines, case_id: str, setting: str) -> None:
    chi_square_case(engines, case_id, setting)


def test_depth_one_dynamic_tree_monte_carlo() -> None:
    """The reproduction from the bug report, on the fixed code: a sampled dynamic tree of depth
    1 with fewer node slots than its branching (2 of 3), verified by spec.verify 40,000 times
    against one fixed p; the first token's law is p. Drawing 3 and keeping the 2 the draft
    likes best (the old construction) fails the same statistic."""
    _, draft = sharp_engines(vocab=4)
    p = torch.tensor([0.1935, 0.3719, 0.0036, 0.4310], dtype=torch.float64)
    cfg = SamplingConfig(temperature=1.0)
    seq = draft.new_sequence()
    root = draft.prefill(seq, [1, 2, 3])
    q = NextTokenLaw(draft, cfg)((1, 2, 3))
    assert 0.5 * float((p - q).abs().sum()) >= 0.3
    budget = Budget(max_nodes=2, max_depth=1, branching=3)
    drafter, n = Drafter(draft), 40_000
    exact = {(x,): float(p[x]) for x in range(4)}

    def first_tokens(wrong: bool, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        draw = value_ranked(multinomial_draw(gen)) if wrong else None
        counts: dict = {}
        for _ in range(n):
            tree = drafter.propose(seq, root, Strategy.DYNAMIC_TREE, budget, cfg, gen, draw=draw)
            qs = {
                node: torch.zeros(4, dtype=torch.float64).index_put_(
                    (torch.tensor(ids),), torch.tensor(probs, dtype=torch.float64)
                )
                for node, (ids, probs) in tree.dists.items()
            }
            rows = p.expand(len(tree.tokens) + 1, 4)
            acc = verify(tree.rule, tree.tokens, tree.parents, rows, qs, gen)
            first = tree.tokens[acc.path[0]] if acc.path else acc.next_token
            counts[(first,)] = counts.get((first,), 0) + 1
        return counts

    chi2, crit = chi_square(first_tokens(False, 1), exact, n)
    assert chi2 < crit, (chi2, crit)
    bad, _ = chi_square(first_tokens(True, 2), exact, n)
    assert bad > crit, (bad, crit)
