"""Detection, membership and uncertainty scores on hand-computable per-token values, and batching:
a padded batch of ragged texts scores each text as it scores alone."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.scoring import detection as D
from services.core.scoring import membership as M
from services.core.scoring.features import pad
from services.core.scoring.uncertainty import summarise

ONE = torch.tensor([[True, True]])


def t(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_detection_scores_by_hand() -> None:
    assert D.log_likelihood(t(-1, -3), ONE).value.item() == -2
    rank = D.log_rank(torch.tensor([[1, 4]]), ONE)
    assert rank.value.item() == pytest.approx(math.log(2)) and rank.per_token[0, 0] == 0
    assert D.mean_entropy(t(1, 2), ONE).value.item() == 1.5
    # log PPL = 2, log X-PPL = 2 -> 1; per-token nll / x-ppl averages to it
    b = D.binoculars(t(-1, -3), t(1, 3), ONE)
    assert b.value.item() == 1.0 and b.per_token[0].tolist() == [0.5, 1.5]
    assert D.binoculars(t(-1, -3), t(4, 4), ONE).value.item() == 0.5
    # (sum lp - sum mu) / sqrt(sum var) = (-2 - -4) / sqrt(1) = 2; per token sums to it
    f = D.fast_detectgpt(t(-1, -1), t(-2, -2), t(0.25, 0.75), ONE)
    assert f.value.item() == 2.0 and f.per_token[0].tolist() == [1.0, 1.0]


def test_min_k_by_hand() -> None:
    values, mask = t(-1, -5, -3, -2, -4), torch.ones(1, 5, dtype=torch.bool)
    assert M.min_k(values, mask, 0.4).item() == -4.5  # floor(5 * .4) = 2 lowest: -5, -4
    assert M.min_k(values, mask, 0.1).item() == -5  # at least one token
    assert M.min_k(values, mask, 1.0).item() == -3
    assert [M.k_count(n, 0.2) for n in (1, 4, 5, 10, 11)] == [1, 1, 1, 2, 2]


def test_min_k_plus_plus_values_by_hand() -> None:
    # (lp - mu) / sigma; a point mass (sigma 0) gives 0
    z = M.min_k_plus_plus_values(t(-1, 0), t(-2, 0), t(4, 0), ONE)
    assert z[0].tolist() == [0.5, 0.0]


def test_first_occurrences_and_dc_pdd_by_hand() -> None:
    ids = torch.tensor([[5, 3, 5, 7, 3], [3, 3, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert M.first_occurrences(ids, mask).tolist() == [[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]]
    # token 0 appears only as padding and is never counted; p = .5, .1, f(5) = e^-1, f(3) = e^-2
    logfreq = torch.zeros(8, dtype=torch.float64)
    logfreq[5], logfreq[3], logfreq[7] = -1.0, -2.0, -1000.0
    lp = torch.tensor([[0.5, 0.1, 0.9, 0.5, 0.9], [0.1, 0.9, 1, 1, 1]], dtype=torch.float64).log()
    beta, alpha = M.dc_pdd(lp, ids, mask, logfreq, cap=10.0)
    # alpha = p * -log f: .5 * 1, .1 * 2, .5 * 1000 -> capped at 10
    assert alpha[0].tolist() == pytest.approx([0.5, 0.2, 0, 10.0, 0])
    assert beta.tolist() == pytest.approx([(0.5 + 0.2 + 10) / 3, 0.2])
    assert M.dc_pdd(lp, ids, mask, logfreq)[1][0].max().item() == M.DC_PDD_CAP


def test_uncertainty_summaries_by_hand() -> None:
    lp = t(math.log(0.5), math.log(0.125))
    u = summarise(lp, t(1, 3), t(2, 6), ONE)
    assert u.prob[0].tolist() == pytest.approx([0.5, 0.125])
    assert u.geometric_mean_prob.item() == pytest.approx(0.25)  # sqrt(.5 * .125)
    assert u.arithmetic_mean_prob.item() == pytest.approx(0.3125)
    assert (u.mean_entropy.item(), u.mean_kurtosis.item()) == (2.0, 4.0)


def test_sequence_scores_batched_equal_alone() -> None:
    torch.manual_seed(1)
    lengths = [6, 1, 4]
    rows = {k: [torch.randn(n, dtype=torch.float64) - 2 for n in lengths] for k in ("lp", "x", "mu")}
    var = [torch.rand(n, dtype=torch.float64) + 0.1 for n in lengths]
    ids = [torch.randint(0, 9, (n,)) for n in lengths]
    logfreq = -torch.rand(9, dtype=torch.float64) * 5

    def scores(lp, x, mu, v, tid, mask) -> list[torch.Tensor]:
        return [
            D.log_likelihood(lp, mask).value,
            D.log_rank(tid + 1, mask).value,
            D.mean_entropy(x, mask).value,
            D.binoculars(lp, x.abs(), mask).value,
            D.fast_detectgpt(lp, mu, v, mask).value,
            M.min_k(lp, mask, 0.3),
            M.min_k(M.min_k_plus_plus_values(lp, mu, v, mask), mask, 0.3),
            M.dc_pdd(lp, tid, mask, logfreq)[0],
            summarise(lp, x, mu, mask).geometric_mean_prob,
        ]

    garbage = float("nan")
    padded = [pad(rows[k], garbage)[0] for k in ("lp", "x", "mu")]
    v, mask = pad(var, garbage)
    batched = scores(*padded, v, pad(ids)[0], mask)
    for b in range(len(lengths)):
        alone = scores(
            *(rows[k][b][None] for k in ("lp", "x", "mu")),
            var[b][None],
            ids[b][None],
            ONE[:, :1].expand(1, lengths[b]),
        )
        for i, (got, want) in enumerate(zip(batched, alone, strict=True)):
            assert got[b].item() == pytest.approx(want.item(), rel=1e-9), i
