"""Losslessness of every acceptance rule.

1. Exact enumeration: for random p, q over a small vocabulary, summing over every way the
   draft could have drawn its children, the token emitted at a node (accepted child or
   residual draw) is distributed exactly as p.
2. Multi-token sampling: a toy bigram target and bigram draft; trees drawn from the draft the
   way each rule assumes; the first tokens produced by repeated verification rounds follow
   the target's own sequence distribution (chi-square over >= 20k samples, fixed seeds).
3. Greedy: the output equals target-only argmax decoding token for token.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from lossless import chi_square, sample_law

from services.core.drafting import DraftTree, add_prompt_lookup
from services.core.params import SamplingConfig
from services.core.sampling import probabilities
from services.core.spec import Rule, node_outcome, verify

V = 5


def rand_dist(gen: torch.Generator, v: int = V, sparse: bool = False) -> torch.Tensor:
    x = torch.rand(v, generator=gen, dtype=torch.float64) ** 2
    if sparse:  # a truncated (top-k style) distribution: some tokens impossible
        x[torch.randperm(v, generator=gen)[: v // 2]] = 0
    return x / x.sum()


def emitted_distribution(
    rule: Rule, p: torch.Tensor, q: torch.Tensor, k: int, lookup: int | None = None
) -> torch.Tensor:
    """Exact law of the emitted token, enumerating the draft's children draws; `lookup`, when
    given, is a deterministically proposed token appended after them (prompt lookup)."""
    out = torch.zeros_like(p)
    support = [x for x in range(len(q)) if q[x] > 0]
    if rule is Rule.TREE_WITHOUT_REPLACEMENT:
        draws = itertools.permutations(support, min(k, len(support)))
    else:
        draws = itertools.product(support, repeat=k)
    for children in draws:
        prob, mass = 1.0, 1.0
        for x in children:
            prob *= float(q[x]) / mass
            if rule is Rule.TREE_WITHOUT_REPLACEMENT:
                mass -= float(q[x])
        if lookup is not None:
            children = (*children, lookup)
        o = node_outcome(rule, p, q, list(children), None if lookup is None else len(children) - 1)
        for j, x in enumerate(children):
            out[x] += prob * o.accept[j]
        out += prob * (1 - o.accept.sum()) * o.residual
    return out


@pytest.mark.parametrize(
    "rule,k",
    [
        (Rule.CHAIN, 0),  # no drawn child: only meaningful with a lookup child
        (Rule.CHAIN, 1),
        (Rule.TREE_IID, 2),
        (Rule.TREE_IID, 3),
        (Rule.TREE_WITHOUT_REPLACEMENT, 2),
        (Rule.TREE_WITHOUT_REPLACEMENT, 4),
        (Rule.SPECTR_KSEQ, 2),
        (Rule.SPECTR_KSEQ, 3),
    ],
)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "truncated"])
@pytest.mark.parametrize("lookup", [False, True], ids=["drawn", "lookup-first"])
def test_single_step_exact_enumeration(rule: Rule, k: int, sparse: bool, lookup: bool) -> None:
    """lookup: a deterministic (prompt-lookup) child is tried before the drawn ones; the law
    stays p whichever token it proposes, one the draft may also draw or one p rules out."""
    # A fixed seed per case (Python's str hash is randomised per process).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rule.value}-{k}-{sparse}-{lookup}".encode()))
    for _ in range(5 if lookup else 20):
        p = rand_dist(gen, sparse=sparse)
        q = rand_dist(gen, sparse=sparse)
        for t in range(V) if lookup else [None]:
            got = emitted_distribution(rule, p, q, k, lookup=t)
            assert torch.allclose(got, p, atol=1e-9), (rule, t, got, p)


@pytest.mark.parametrize(
    "rule,k",
    [
        (Rule.CHAIN, 0),
        (Rule.CHAIN, 1),
        (Rule.TREE_IID, 2),
        (Rule.TREE_WITHOUT_REPLACEMENT, 2),
        (Rule.SPECTR_KSEQ, 2),
    ],
)
def test_lookup_child_of_a_certain_token_is_accepted(rule: Rule, k: int) -> None:
    p = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q = rand_dist(torch.Generator().manual_seed(4))
    assert emitted_distribution(rule, p, q, k, lookup=1)[1] == pytest.approx(1.0)


def test_spectr_kseq_starts_at_the_single_draft_optimum_and_grows_with_candidates() -> None:
    """K-SEQ with one candidate accepts with probability sum_x min(p, q) (the optimum for a
    single draft, Leviathan et al.); a second i.i.d. candidate never lowers it."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        p, q = rand_dist(gen), rand_dist(gen)
        one = sum(
            float(q[x]) * float(node_outcome(Rule.SPECTR_KSEQ, p, q, [x]).accept.sum()) for x in range(V)
        )
        two = sum(
            float(q[x]) * float(q[y]) * float(node_outcome(Rule.SPECTR_KSEQ, p, q, [x, y]).accept.sum())
            for x in range(V)
            for y in range(V)
        )
        assert one == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-12)
        assert two >= one - 1e-12


# --- multi-token: toy bigram models -----------------------------------------------------------


class Bigram:
    def __init__(self, seed: int, v: int = 4, sharp: float = 2.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(v, v, generator=g) * sharp  # [prev, next]

    def probs(self, prev: int, cfg: SamplingConfig) -> torch.Tensor:
        return probabilities(self.logits[prev], cfg).double()


def draw_tree(
    draft: Bigram,
    root_prev: int,
    rule: Rule,
    cfg: SamplingConfig,
    gen: torch.Generator,
    branching: int,
    depth: int,
):
    """Children per node as the rule assumes: i.i.d. (chain/iid/kseq) or without replacement."""
    tokens, parents, q = [], [], {}
    frontier = [(-1, root_prev)]
    for _ in range(depth):
        nxt = []
        for node, prev in frontier:
            qd = draft.probs(prev, cfg)
            q[node] = qd
            if rule is Rule.TREE_WITHOUT_REPLACEMENT:
                n = min(branching, int((qd > 0).sum()))
                picks = torch.multinomial(qd.float(), n, replacement=False, generator=gen).tolist()
            else:
                picks = torch.multinomial(qd.float(), branching, replacement=True, generator=gen).tolist()
            for x in picks:
                tokens.append(x)
                parents.append(node)
                nxt.append((len(tokens) - 1, x))
        frontier = nxt
    return tokens, parents, q


def speculative_sequence(
    target: Bigram,
    draft: Bigram,
    rule: Rule,
    cfg: SamplingConfig,
    gen: torch.Generator,
    length: int,
    branching: int,
    depth: int,
    lookup_tokens: int = 0,
) -> tuple[int, ...]:
    """lookup_tokens > 0: the draft's real prompt-lookup merge (add_prompt_lookup) over the
    history so far (a start token 0, then the output) adds deterministic nodes to each tree."""
    out, prev = [], 0
    while len(out) < length:
        tokens, parents, q = draw_tree(draft, prev, rule, cfg, gen, branching, depth)
        lookup: frozenset[int] = frozenset()
        if lookup_tokens:
            tree = DraftTree(tokens=tokens, parents=parents, logprobs=[0.0] * len(tokens), rule=rule)
            add_prompt_lookup(tree, [0, 0, *out], lookup_tokens)
            lookup = frozenset(tree.lookup)
        rows = [target.probs(prev, cfg)] + [target.probs(t, cfg) for t in tokens]
        acc = verify(rule, tokens, parents, torch.stack(rows), q, gen, lookup)
        emitted = [tokens[i] for i in acc.path] + [acc.next_token]
        out += emitted
        prev = emitted[-1]
    return tuple(out[:length])


def exact_sequence_law(target: Bigram, cfg: SamplingConfig, length: int) -> dict[tuple[int, ...], float]:
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        new = {}
        for seq, pr in law.items():
            p = target.probs(seq[-1] if seq else 0, cfg)
            for x in range(len(p)):
                if p[x] > 0:
                    new[seq + (x,)] = pr * float(p[x])
        law = new
    return law


def chi_square_ok(counts: dict, law: dict, n: int) -> tuple[bool, float, float]:
    assert set(counts) <= set(law), "produced a sequence the target cannot produce"
    cells = [s for s in law if law[s] * n >= 5]
    rest = 1.0 - sum(law[s] for s in cells)
    chi2 = sum((counts.get(s, 0) - law[s] * n) ** 2 / (law[s] * n) for s in cells)
    if rest * n >= 5:
        other = n - sum(counts.get(s, 0) for s in cells)
        chi2 += (other - rest * n) ** 2 / (rest * n)
        dof = len(cells)
    else:
        dof = len(cells) - 1
    z = 3.29  # 99.95% quantile, Wilson-Hilferty
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2 < crit, chi2, crit


# (rule, branching, depth, lookup_tokens): the last rows merge the prompt-lookup path into
# every tree (a 4-token vocabulary repeats often, so the lookup fires in most rounds)
MULTI = [
    (Rule.CHAIN, 1, 3, 0),
    (Rule.TREE_IID, 2, 2, 0),
    (Rule.TREE_WITHOUT_REPLACEMENT, 2, 2, 0),
    (Rule.SPECTR_KSEQ, 3, 2, 0),
    (Rule.CHAIN, 1, 2, 2),
    (Rule.TREE_WITHOUT_REPLACEMENT, 2, 2, 2),
    (Rule.SPECTR_KSEQ, 2, 2, 2),
]

CFGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.0, top_p=0.8)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule,branching,depth,lookup_tokens,cfg",
    # each row at one setting, alternating, to keep the slow suite inside CI's time
    [(*m, CFGS[i % 2]) for i, m in enumerate(MULTI)],
    ids=[m[0].value + ("+lookup" if m[3] else "") + ("-T1", "-top_p0.8")[i % 2] for i, m in enumerate(MULTI)],
)
def test_multi_token_outputs_follow_target_chi_square(rule, branching, depth, lookup_tokens, cfg) -> None:
    target, draft = Bigram(1), Bigram(2, sharp=1.0)
    length, n = 3, 20000
    gen = torch.Generator().manual_seed(12 if lookup_tokens else 11)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        s = speculative_sequence(target, draft, rule, cfg, gen, length, branching, depth, lookup_tokens)
        counts[s] = counts.get(s, 0) + 1
    law = exact_sequence_law(target, cfg, length)
    ok, chi2, crit = chi_square_ok(counts, law, n)
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - law[s]) for s in law)
    assert ok, f"chi2={chi2:.1f} >= {crit:.1f} (TV={tv:.4f})"
    assert tv < 0.03
    # Negative control: the same statistic rejects the draft's own samples.
    wrong, _ = chi_square(sample_law(exact_sequence_law(draft, cfg, length), n, seed=13), law, n)
    assert wrong > crit, f"the draft's own samples pass: chi2={wrong:.1f} < {crit:.1f}"


@pytest.mark.parametrize(
    "draw_rule", [Rule.CHAIN, Rule.TREE_IID, Rule.TREE_WITHOUT_REPLACEMENT], ids=lambda r: r.value
)
def test_greedy_output_equals_target_argmax_decoding(draw_rule: Rule) -> None:
    """Greedy verification is lossless for any tree: trees drawn as `draw_rule` draws them
    (sampled from the draft, so they often miss the argmax) still give target-only argmax."""
    target, draft = Bigram(5), Bigram(6)
    greedy = SamplingConfig()
    gen = torch.Generator().manual_seed(0)
    expected, prev, out = [], 0, []
    for _ in range(12):
        prev = int(target.logits[prev].argmax())
        expected.append(prev)
    prev = 0
    while len(out) < 12:
        tokens, parents, _ = draw_tree(draft, prev, draw_rule, SamplingConfig(temperature=1.0), gen, 2, 3)
        rows = [target.probs(prev, greedy)] + [target.probs(t, greedy) for t in tokens]
        acc = verify(Rule.GREEDY, tokens, parents, torch.stack(rows), {}, gen)
        out += [tokens[i] for i in acc.path] + [acc.next_token]
        prev = out[-1]
    assert out[:12] == expected
