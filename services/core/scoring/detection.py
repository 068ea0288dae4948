"""Machine-text detection scores from per-token features, batched: inputs [B, T] with a mask.

Each score comes with the per-token values it is built from (`per_token`), chosen so that the
score is their mean (log-likelihood, log-rank, entropy, Binoculars) or their sum
(Fast-DetectGPT), i.e. a reader can see which tokens drive it.

Direction (what the scores mean, as in the papers): machine-written text scores HIGHER on
log-likelihood and Fast-DetectGPT, LOWER on log-rank, entropy and Binoculars.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.scoring.features import masked, masked_mean


@dataclass
class Score:
    value: torch.Tensor  # [B] float64
    per_token: torch.Tensor  # [B, T] float64, 0 at padding


def log_likelihood(logprob: torch.Tensor, mask: torch.Tensor) -> Score:
    """Mean log p(x_t | x_<t) (the classic zero-shot baseline, e.g. GLTR / DetectGPT's
    'likelihood'): machine text is more likely under a similar model."""
    lp = masked(logprob.double(), mask)
    return Score(masked_mean(lp, mask), lp)


def log_rank(rank: torch.Tensor, mask: torch.Tensor) -> Score:
    """Mean log rank of each token (1 = the argmax; DetectGPT arXiv 2301.11305's 'log-rank'
    baseline): machine text sits near the top of the model's ranking, so lower = machine."""
    lr = masked(rank.double().log(), mask)
    return Score(masked_mean(lr, mask), lr)


def mean_entropy(token_entropy: torch.Tensor, mask: torch.Tensor) -> Score:
    """Mean predictive entropy (nats) at each position (GLTR-style baseline): lower = machine."""
    h = masked(token_entropy.double(), mask)
    return Score(masked_mean(h, mask), h)


def binoculars(performer_logprob: torch.Tensor, cross_entropy: torch.Tensor, mask: torch.Tensor) -> Score:
    """Binoculars (Hans et al., arXiv 2401.12070): B = log PPL / log X-PPL.

    log PPL   = -mean_t log p_performer(x_t)                       (the text's surprise)
    log X-PPL = mean_t  E_{v ~ observer_t}[-log p_performer(v)]    (`cross_entropy`, how surprising
                the observer's own guesses are to the performer: the baseline surprise of any
                text in that context)

    Roles as in the reference implementation: the performer scores the text, the observer's
    distribution weights the cross term (there Falcon-7b-instruct and Falcon-7b). Lower = machine.
    per_token = -log p_performer(x_t) / log X-PPL, whose mean is B.
    """
    nll = masked(-performer_logprob.double(), mask)
    x_ppl = masked_mean(cross_entropy.double(), mask)  # [B]
    return Score(masked_mean(nll, mask) / x_ppl, nll / x_ppl[:, None])


def fast_detectgpt(
    logprob: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor, mask: torch.Tensor
) -> Score:
    """Fast-DetectGPT's analytic sampling discrepancy (Bao et al., arXiv 2310.05130):

        d = (sum_t log p(x_t) - sum_t mu_t) / sqrt(sum_t sigma_t^2)

    with mu_t, sigma_t^2 the mean and variance of log p_scoring(x~) for x~ drawn from the sampling
    model at position t (`features.logprob_moments(sampling, scoring)`), i.e. the z-score of the
    text's log-likelihood among texts the sampling model would write in the same contexts.
    Higher = machine. per_token = (log p(x_t) - mu_t) / sqrt(sum sigma^2), whose sum is d.
    """
    diff = masked(logprob.double() - ref_mean.double(), mask)
    scale = masked(ref_var.double(), mask).sum(-1).sqrt()  # [B]
    per_token = diff / scale[:, None]
    return Score(per_token.sum(-1), per_token)
