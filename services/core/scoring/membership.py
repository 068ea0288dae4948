"""Membership inference (was this text in the training data?), batched: inputs [B, T] + mask.

Every score is oriented as the proto says: higher = more likely seen in training.
"""

from __future__ import annotations

import math

import torch

from services.core.scoring.features import masked

DEFAULT_K_FRACTION = 0.2  # Min-K%'s k = 20%, the value both papers report as a good default
DC_PDD_CAP = 0.01  # DC-PDD's upper bound a on each token's score (the paper's default)


def k_count(n: int, k_fraction: float) -> int:
    """How many of n tokens Min-K% averages: floor(n * k), at least 1 so short texts get a score."""
    return max(1, math.floor(n * k_fraction))


def min_k(values: torch.Tensor, mask: torch.Tensor, k_fraction: float = DEFAULT_K_FRACTION) -> torch.Tensor:
    """Mean of the lowest k% of per-token values of each text -> [B] float64.

    Min-K% Prob (Shi et al., arXiv 2310.16789) with values = log p(x_t): a text seen in
    training has few very unlikely tokens. Min-K%++ passes the normalised values of
    :func:`min_k_plus_plus_values` instead.
    """
    lengths = mask.sum(-1)  # [B]
    inf = torch.tensor(math.inf, dtype=torch.float64)
    ordered = torch.where(mask, values.double(), inf).sort(-1).values  # padding sorts last
    ks = torch.tensor([k_count(int(n), k_fraction) for n in lengths])
    take = torch.arange(values.shape[-1])[None, :] < ks[:, None]  # [B, T]
    return torch.where(take, ordered, 0.0).sum(-1) / ks


def min_k_plus_plus_values(
    logprob: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Min-K%++'s per-token score (Zhang et al., arXiv 2404.02936):

        (log p(x_t) - mu_t) / sigma_t,   mu_t, sigma_t^2 = mean, var of log p(v), v ~ p(. | x_<t)

    (`features.logprob_moments(logp, logp)`): how far the token sits above the model's own
    expectation at that position, since training drives the seen token to a local maximum of
    the likelihood. A point mass (sigma = 0, the token certain) gets 0. -> [B, T] float64.
    """
    sigma = var.double().sqrt()
    z = torch.where(sigma > 0, (logprob.double() - mean.double()) / sigma.clamp_min(1e-300), 0.0)
    return masked(z, mask)


def first_occurrences(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where targets[b, t] appears for the first time among the real tokens of
    row b (DC-PDD scores each distinct token once, so a repeated word does not dominate)."""
    B, T = targets.shape
    pos = torch.arange(T).expand(B, T)
    pos = torch.where(mask, pos, T)  # padding never wins the minimum
    vocab = int(targets.max()) + 1 if targets.numel() else 1
    first = torch.full((B, vocab), T, dtype=torch.long).scatter_reduce(1, targets.long(), pos, "amin")
    return mask & (first.gather(1, targets.long()) == torch.arange(T))


def dc_pdd(
    logprob: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logfreq: torch.Tensor,
    cap: float = DC_PDD_CAP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DC-PDD (Zhang et al., arXiv 2409.14781): calibrate each token's probability by how common
    the token is in a reference corpus.

        alpha_t = min(p(x_t) * -log f(x_t), a)      f = reference token frequency (smoothed)
        beta    = mean of alpha_t over the first occurrence of each distinct token

    A token the model finds likely although it is rare in general text points to memorisation.
    ref_logfreq [V]: log f (see services.core.scoring.reference). -> (beta [B], alpha [B, T]),
    alpha 0 where not counted.
    """
    counted = first_occurrences(targets, mask)
    alpha = (logprob.double().exp() * -ref_logfreq.double()[targets.long()]).clamp_max(cap)
    alpha = masked(alpha, counted)
    return alpha.sum(-1) / counted.sum(-1), alpha
