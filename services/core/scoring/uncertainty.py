"""Token-level uncertainty and sequence summaries, as in 'Visualizing Uncertainty in Translation
Tasks' (Park et al., arXiv 2501.17187): per-token probability, entropy and kurtosis of the
next-token distribution; geometric and arithmetic mean of the token probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.scoring.features import masked, masked_mean


@dataclass
class Uncertainty:
    prob: torch.Tensor  # [B, T] p(x_t | x_<t)
    geometric_mean_prob: torch.Tensor  # [B] exp(mean log p) = 1 / perplexity
    arithmetic_mean_prob: torch.Tensor  # [B] mean p: forgiving of a few very unlikely tokens
    mean_entropy: torch.Tensor  # [B] nats
    mean_kurtosis: torch.Tensor  # [B] (the paper's third metric)


def summarise(
    logprob: torch.Tensor, token_entropy: torch.Tensor, kurtosis: torch.Tensor, mask: torch.Tensor
) -> Uncertainty:
    """Inputs [B, T] from services.core.scoring.features (token_logprob, entropy,
    probability_kurtosis) and the mask of scored positions."""
    lp = logprob.double()
    return Uncertainty(
        prob=masked(lp.exp(), mask),
        geometric_mean_prob=masked_mean(lp, mask).exp(),
        arithmetic_mean_prob=masked_mean(lp.exp(), mask),
        mean_entropy=masked_mean(token_entropy.double(), mask),
        mean_kurtosis=masked_mean(kurtosis.double(), mask),
    )
