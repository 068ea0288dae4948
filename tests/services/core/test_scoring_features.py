"""Per-token features on hand-computable distributions, and batching: padded batches of ragged
texts give each text the values it gets alone."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.scoring import features as F

LN2 = math.log(2)


def dist(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_hand_computed_features() -> None:
    logp = torch.stack([dist(0.5, 0.25, 0.25), dist(1 / 3, 1 / 3, 1 / 3)])[None]  # [1, 2, 3]
    targets = torch.tensor([[1, 0]])
    assert F.token_logprob(logp, targets)[0].tolist() == pytest.approx([math.log(0.25), math.log(1 / 3)])
    # ties rank best: token 1 shares its probability with token 2, only token 0 is above it
    assert F.token_rank(logp, targets).tolist() == [[2, 1]]
    assert F.entropy(logp)[0].tolist() == pytest.approx([1.5 * LN2, math.log(3)], rel=1e-6)
    mean, var = F.logprob_moments(logp, logp)
    # E log p = .5 ln .5 + .5 ln .25 = -1.5 ln2; E (log p)^2 = 2.5 ln2^2 -> var = .25 ln2^2
    assert mean[0].tolist() == pytest.approx([-1.5 * LN2, -math.log(3)], rel=1e-6)
    assert var[0].tolist() == pytest.approx([0.25 * LN2**2, 0.0], abs=1e-6)
    # observer [.5, .25, .25] against a uniform performer: -E log(1/3) = ln 3
    assert F.cross_entropy(logp[:, :1], logp[:, 1:]).item() == pytest.approx(math.log(3), rel=1e-6)
    # values [.5, .25, .25]: m2 = 1/72, m4 = 1/3456 -> m4 / m2^2 - 3 = 1.5 - 3; uniform -> 0
    assert F.probability_kurtosis(logp)[0].tolist() == pytest.approx([-1.5, 0.0], abs=1e-4)


def test_zero_probabilities_give_finite_values() -> None:
    logp = torch.tensor([[[0.0, -math.inf, -math.inf]]])  # a point mass
    assert F.entropy(logp).item() == 0.0
    mean, var = F.logprob_moments(logp, logp)
    assert (mean.item(), var.item()) == (0.0, 0.0)
    assert F.cross_entropy(logp, logp).item() == 0.0
    assert math.isfinite(F.probability_kurtosis(logp).item())


def test_masked_mean_and_pad() -> None:
    padded, mask = F.pad([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0])])
    assert padded.tolist() == [[1, 2, 3], [5, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    garbage = torch.where(mask, padded, torch.tensor(1e9))
    assert F.masked_mean(garbage, mask).tolist() == [2.0, 5.0]


def test_batched_features_equal_each_text_alone() -> None:
    torch.manual_seed(0)
    V, lengths = 11, [5, 1, 3]
    logits = [torch.randn(n, V) * 3 for n in lengths]
    obs = [torch.randn(n, V) for n in lengths]
    targets = [torch.randint(0, V, (n,)) for n in lengths]
    lp, mask = F.pad(logits, value=float("nan"))  # padding must not leak into real rows
    op, _ = F.pad(obs)
    tp, _ = F.pad(targets)
    batched = F.token_features(lp, tp, op)
    for b, n in enumerate(lengths):
        alone = F.token_features(logits[b][None], targets[b][None], obs[b][None])
        for name in ("logprob", "rank", "entropy", "var", "kurtosis", "cross_entropy"):
            got = getattr(batched, name)[b, :n]
            assert torch.allclose(got.double(), getattr(alone, name)[0].double(), atol=1e-5), name
    assert mask.tolist() == [[1] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
