"""The relaxed rules (LANTERN, GSD) as pure functions: their groups, their closed-form
outcomes, and that with one-token groups they are the exact chain rule draw for draw."""

from __future__ import annotations

import torch

from services.core.image_spec import (
    GroupRule,
    cosine_distances,
    grouped_outcome,
    gsd_group,
    lantern_group,
    verify_chain_grouped,
)
from services.core.spec import Rule, chain_parents, verify

V = 12


def rand_dist(gen: torch.Generator, sharp: float = 3.0) -> torch.Tensor:
    p = (sharp * torch.randn(V, generator=gen, dtype=torch.float64)).softmax(-1)
    return p


def test_lantern_group_is_the_longest_prefix_within_the_tv_budget() -> None:
    p = torch.tensor([0.4, 0.05, 0.1, 0.2, 0.25], dtype=torch.float64)
    nb = torch.tensor([1, 2, 3, 4])  # nearest first
    assert lantern_group(p, 0, nb, 0.0).tolist() == [0]
    assert lantern_group(p, 0, nb, 0.05).tolist() == [0, 1]
    assert lantern_group(p, 0, nb, 0.149).tolist() == [0, 1]
    assert lantern_group(p, 0, nb, 0.15).tolist() == [0, 1, 2]
    # the moved mass is the TV distance between p and the relaxed target
    for delta in (0.0, 0.1, 0.2, 0.35, 1.0):
        g = lantern_group(p, 0, nb, delta)
        relaxed = p.clone()
        relaxed[0] = p[g].sum()
        relaxed[g[1:]] = 0.0
        assert 0.5 * float((relaxed - p).abs().sum()) <= delta + 1e-12


def test_lantern_groups_are_nested_in_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = rand_dist(gen)
        nb = torch.randperm(V, generator=gen)[: V - 1]
        x = int(torch.arange(V)[~torch.isin(torch.arange(V), nb)][0])
        prev: set[int] = set()
        for delta in torch.linspace(0, 1, 11).tolist():
            g = set(lantern_group(p, x, nb, delta).tolist())
            assert prev <= g and x in g
            prev = g


def test_grouped_outcome_with_one_token_is_the_exact_chain_rule() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        p, q = rand_dist(gen), rand_dist(gen)
        x = int(torch.multinomial(q, 1, generator=gen))
        a, residual = grouped_outcome(p, q, torch.tensor([x]))
        assert abs(a - min(1.0, float(p[x] / q[x]))) < 1e-12
        if a < 1:
            want = torch.clamp(p - q, min=0)
            assert torch.allclose(residual, want / want.sum())


def test_grouped_acceptance_counts_the_neighbours_mass() -> None:
    """The motivating case: the draft favours x, the target spreads the same mass over x and its
    latent neighbour. Exact acceptance is p(x)/q(x); grouped, (p(x)+p(y))/(q(x)+q(y))."""
    p = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.8, 0.0, 0.2], dtype=torch.float64)
    exact, _ = grouped_outcome(p, q, torch.tensor([0]))
    grouped, residual = grouped_outcome(p, q, torch.tensor([0, 1]))
    assert abs(exact - 0.375) < 1e-12 and abs(grouped - 0.75) < 1e-12
    assert residual.tolist() == [0.0, 0.0, 1.0]  # a rejection never re-emits the group


def test_expected_acceptance_grows_with_delta_when_neighbours_carry_mass() -> None:
    """With target mass shared between latent neighbours and a draft concentrated on one of
    them, E_q[accept] grows with delta and is 1 once the whole pair is one group.

    Not monotone in general: a neighbour the draft favours more than the target lowers the
    ratio (the second case, where 0's second-nearest code is the other drafted token)."""
    p = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    q = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64)

    def rates(neighbours: torch.Tensor) -> list[float]:
        out = []
        for delta in (0.0, 0.1, 0.25, 0.5):
            rule = GroupRule("lantern", neighbours=neighbours, delta=delta)
            out.append(sum(float(q[x]) * grouped_outcome(p, q, rule.group(p, x))[0] for x in (0, 2)))
        return out

    good = rates(torch.tensor([[1, 3, 2], [0, 3, 2], [3, 1, 0], [2, 1, 0]]))
    assert good == [0.5, 0.5, 1.0, 1.0]
    mixed = rates(torch.tensor([[1, 2, 3], [0, 3, 2], [3, 0, 1], [2, 1, 0]]))
    assert mixed == [0.5, 0.5, 1.0, 0.75]


def test_gsd_group_filters_by_rank_window_probability_and_latent_distance() -> None:
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10], dtype=torch.float64)
    codebook = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05], [1.0, 0.02]])
    dist = cosine_distances(codebook)
    assert gsd_group(p, 1, dist[1], 1).tolist() == [1]
    g = gsd_group(p, 1, dist[1], 3)  # window: ranks 0..2 = tokens 0, 1, 2; 2 is far in latent space
    assert sorted(g.tolist()) == [0, 1]
    g5 = gsd_group(p, 2, dist[2], 5)  # token 2 has no latent neighbour: alone
    assert g5.tolist() == [2]


def test_one_token_groups_give_the_exact_rule_draw_for_draw() -> None:
    """LANTERN at delta = 0 and GSD at group size 1 through verify_chain_grouped make the same
    accept/reject decisions and emit the same tokens as spec.verify's chain rule."""
    gen = torch.Generator().manual_seed(2)
    neighbours = torch.stack([torch.roll(torch.arange(V), -i)[1:5] for i in range(V)])
    rules = [
        GroupRule("lantern", neighbours=neighbours, delta=0.0),
        GroupRule("gsd", cos_dist=torch.zeros(V, V, dtype=torch.float64), size=1),
    ]
    for trial in range(40):
        n = 4
        q = torch.stack([rand_dist(gen) for _ in range(n)])
        p = torch.stack([rand_dist(gen) for _ in range(n + 1)])
        tokens = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(n)]
        want = verify(
            Rule.CHAIN,
            tokens,
            chain_parents(n),
            p,
            {i - 1: q[i] for i in range(n)},
            torch.Generator().manual_seed(trial),
        )
        for rule in rules:
            got = verify_chain_grouped(rule, tokens, p, q, torch.Generator().manual_seed(trial))
            assert (got.path, got.next_token) == (want.path, want.next_token)
