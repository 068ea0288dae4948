"""Fused chain speculative sampling: the reference follows services.core.spec's CHAIN rule and
emits tokens distributed as the target (with a negative control), and the Triton kernel (on
Triton's interpreter) returns the reference's decisions and tokens on random batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from lossless import chi_square

from kernels.spec_sampling import _inverse_cdf, chain_accept, chain_accept_reference
from services.core.spec import sequential_outcome


def sharp(shape: tuple[int, ...], gen: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    """Random distributions over the last dim, peaked enough that p and q differ a lot."""
    return (scale * torch.randn(*shape, generator=gen)).softmax(-1)


def random_batch(seed: int, B: int = 4, N: int = 5, V: int = 50):
    gen = torch.Generator().manual_seed(seed)
    q = sharp((B, N, V), gen)
    p = sharp((B, N + 1, V), gen)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, N)
    lengths = torch.randint(0, N + 1, (B,), generator=gen)
    return tokens, lengths, p, q, torch.rand(B, N, generator=gen), torch.rand(B, generator=gen)


def test_reference_acceptance_and_residual_are_specs_chain_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(40):
        V = 12
        p, q = sharp((V,), gen).double(), sharp((V,), gen).double()
        x = int(torch.multinomial(q.float(), 1, generator=gen))
        rule = sequential_outcome(p, q, [x], without_replacement=False)
        u = float(torch.rand((), generator=gen))
        accepted, _ = chain_accept_reference(
            torch.tensor([[x]]), torch.tensor([1]), torch.stack([p, p])[None], q[None, None],
            torch.tensor([[u]]), torch.tensor([0.5]),
        )  # fmt: skip
        assert int(accepted) == int(u < float(rule.accept[0]))
        if float(rule.accept[0]) >= 1.0:
            continue  # x is always accepted: there is no residual to compare
        # The law of the emitted token after a rejection: evaluate the inverse CDF on a fine grid.
        grid = torch.linspace(0, 1, 20001, dtype=torch.float64)[:-1] + 0.5 / 20000
        residual = torch.clamp(p - q, min=0).float().expand(len(grid), V)
        law = torch.bincount(_inverse_cdf(residual, grid.float()), minlength=V).double() / len(grid)
        assert (law - rule.residual).abs().max() <= 1e-3
        compared += 1
    assert compared >= 10


def first_token_counts(sampler, p0: torch.Tensor, q0: torch.Tensor, n: int, seed: int) -> Counter:
    """Counts of the first emitted token over n independent one-token chains (x ~ q0)."""
    gen = torch.Generator().manual_seed(seed)
    V = p0.shape[0]
    tokens = torch.multinomial(q0, n, replacement=True, generator=gen)[:, None]  # [n, 1]
    p = torch.stack([p0, sharp((V,), gen)]).expand(n, 2, V)  # row 1 (the bonus) is never the first
    q = q0.expand(n, 1, V)
    accepted, nxt = sampler(tokens, torch.ones(n, dtype=torch.long), p, q, torch.rand(n, 1, generator=gen),
                            torch.rand(n, generator=gen))  # fmt: skip
    first = torch.where(accepted > 0, tokens[:, 0], nxt)
    return Counter({(int(t),): int(c) for t, c in zip(*torch.unique(first, return_counts=True), strict=True)})


def wrong_sampler(tokens, lengths, p, q, u_accept, u_emit):
    """Known wrong: after a rejection it draws from p instead of the residual max(0, p - q)."""
    accepted, _ = chain_accept_reference(tokens, lengths, p, q, u_accept, u_emit)
    return accepted, _inverse_cdf(p[:, 0], u_emit)


def test_emitted_tokens_follow_the_target_and_a_wrong_residual_is_caught() -> None:
    gen = torch.Generator().manual_seed(3)
    V, n = 8, 40_000
    p0, q0 = sharp((V,), gen), sharp((V,), gen)
    assert 0.5 * float((p0 - q0).abs().sum()) >= 0.3  # the test has power only where p and q differ
    law = {(v,): float(p0[v]) for v in range(V)}
    stat, crit = chi_square(first_token_counts(chain_accept, p0, q0, n, seed=1), law, n)
    assert stat <= crit, (stat, crit)
    bad, crit = chi_square(first_token_counts(wrong_sampler, p0, q0, n, seed=1), law, n)
    assert bad > 10 * crit, (bad, crit)


def test_triton_kernel_returns_the_references_decisions_and_tokens() -> None:
    pytest.importorskip("triton")
    from kernels.triton.spec_sampling import chain_accept_triton

    cases = 0
    for seed in range(50):
        B, N, V = 1 + seed % 4, seed % 7, (50, 97, 5000)[seed % 3]  # N = 0: no draft at all
        batch = random_batch(seed, B, N, V)
        ref = chain_accept_reference(*batch)
        out = chain_accept_triton(*batch)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), seed
        cases += B
    assert cases >= 100


def test_empty_residual_falls_back_to_the_target() -> None:
    """q >= p everywhere (here q = p) and a rejection: the token comes from p, never from nothing."""
    p = torch.tensor([[[0.0, 0.25, 0.75], [1 / 3, 1 / 3, 1 / 3]]])
    args = (
        torch.tensor([[1]]),
        torch.tensor([1]),
        p,
        p[:, :1].clone(),
        torch.tensor([[0.99]]),
        torch.tensor([0.1]),
    )
    # u * q(x) = 0.2475 < p(x) = 0.25: accepted, so force a rejection through u = 1.0 instead.
    args = (*args[:4], torch.tensor([[1.0]]), args[5])
    accepted, token = chain_accept_reference(*args)
    assert int(accepted) == 0 and int(token) in (1, 2)
    try:
        from kernels.triton.spec_sampling import chain_accept_triton
    except ImportError:
        return
    assert chain_accept_triton(*args)[1].tolist() == token.tolist()
