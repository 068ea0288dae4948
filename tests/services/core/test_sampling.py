"""Sampling math: the processed distribution is exactly what temperature/top-k/top-p define,
and draws follow it (chi-square on fixed-seed samples, so the test is deterministic)."""

import math

import pytest
import torch

from services.core.params import SamplingConfig
from services.core.sampling import next_token, probabilities, round_generator, sample


def brute_force(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Reference written independently: sort once, walk the list."""
    p = (logits.double() / cfg.temperature).softmax(-1)
    order = sorted(range(len(p)), key=lambda i: -float(logits[i]))
    keep = set(order[: cfg.top_k] if cfg.top_k else order)
    if 0 < cfg.top_p < 1:
        p_k = torch.zeros_like(p)
        for i in keep:
            p_k[i] = p[i]
        p_k /= p_k.sum()
        mass, nucleus = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            nucleus.add(i)
            mass += float(p_k[i])
            if mass >= cfg.top_p:
                break
        keep = nucleus
    out = torch.zeros_like(p)
    for i in keep:
        out[i] = p[i]
    return (out / out.sum()).float()


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.7, top_k=5),
        SamplingConfig(temperature=1.3, top_p=0.8),
        SamplingConfig(temperature=0.9, top_k=10, top_p=0.5),
        SamplingConfig(temperature=1.0, top_p=0.999),
    ],
)
def test_probabilities_match_reference(cfg: SamplingConfig) -> None:
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(40) * 2
        got = probabilities(logits, cfg)
        assert torch.allclose(got, brute_force(logits, cfg), atol=1e-6)
        assert abs(float(got.sum()) - 1) < 1e-5


def test_greedy_is_one_hot_argmax() -> None:
    logits = torch.randn(3, 17)
    p = probabilities(logits, SamplingConfig())
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.sum(-1), torch.ones(3))
    assert next_token(logits[0], SamplingConfig()) == int(logits[0].argmax())


def test_draws_follow_the_distribution_chi_square() -> None:
    torch.manual_seed(1)
    probs = probabilities(torch.randn(12) * 1.5, SamplingConfig(temperature=1.0, top_p=0.95))
    n = 20000
    draws = sample(probs.expand(n, -1), torch.Generator().manual_seed(7))
    counts = torch.bincount(draws, minlength=12).double()
    support = probs > 0
    assert counts[~support].sum() == 0  # never outside the nucleus
    expected = probs.double()[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square via the Wilson-Hilferty approximation.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit)


def test_round_generator_is_counter_based() -> None:
    a = torch.rand(5, generator=round_generator(42, 3))
    b = torch.rand(5, generator=round_generator(42, 3))
    c = torch.rand(5, generator=round_generator(42, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "cfg,field",
    [
        (SamplingConfig(temperature=-0.1), "sampling.temperature"),
        (SamplingConfig(temperature=float("nan")), "sampling.temperature"),
        (SamplingConfig(top_k=-1), "sampling.top_k"),
        (SamplingConfig(top_p=1.01), "sampling.top_p"),
    ],
)
def test_validation_names_the_field(cfg: SamplingConfig, field: str) -> None:
    from services.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        cfg.validate(vocab_size=100)
    assert e.value.field == field


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-20])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5)])
def test_tiny_temperature_is_the_greedy_limit_not_nan(temperature, top_k, top_p) -> None:
    """Any T > 0 samples: a tiny one gives the T -> 0 limit (uniform over the tied largest
    logits), never NaN from inf - inf (1e-45 is a float32 denormal, as it arrives on the wire)."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0, 0.5], [-1.0, 0.0, 2.5, float("-inf"), 2.0]])
    cfg = SamplingConfig(
        temperature=float(torch.tensor(temperature, dtype=torch.float32)), top_k=top_k, top_p=top_p
    )
    probs = probabilities(logits, cfg)
    assert torch.isfinite(probs).all()
    if top_p == 0.5:  # the nucleus of two equal maxima keeps the first in sorted order only
        assert probs[0].max() == 1.0 and probs[0][[1, 3]].sum() == 1.0
    else:
        assert probs[0].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert probs[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    gen = torch.Generator().manual_seed(0)
    assert all(next_token(logits[1], cfg, gen) == 2 for _ in range(20))
