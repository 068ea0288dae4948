"""A learned machine-text detector in the manner of PAWN ("Not all tokens are created equal:
perplexity attention weighted networks for AI generated text detection", arXiv 2501.03940).

Zero-shot detectors average one per-token statistic with equal weights. PAWN keeps the
per-token statistics of the scoring model's next-token distributions, but learns (a) a value per
token from those statistics and the model's last hidden state, and (b) a gate from the hidden
state that decides how much each token counts; the text's logit is the gated average of the
values. Tokens whose statistics say little (the opening words of a sentence, a forced
continuation of a name) can then be weighted down.

Inputs per text (T tokens, each predicted from the ones before it, as services.core.scoring.runner
scores them):

- ``features`` [B, T, F]: :data:`FEATURE_NAMES`, from :func:`token_inputs`; standardised inside
  the network with the training set's mean and std (buffers, so the ONNX file carries them);
- ``hidden`` [B, T, H]: the scoring model's final hidden state at the position that predicts
  each token;
- ``mask`` [B, T]: 1.0 for real tokens, 0.0 for padding (float, so the ONNX graph needs no bool
  inputs).

Output: one logit per text, [B]; sigmoid(logit) is the probability that the text is machine
written (trained with a balanced binary cross-entropy).
"""

from __future__ import annotations

import torch
from torch import nn

from services.core.scoring.features import TokenFeatures

FEATURE_NAMES = ("logprob", "log_rank", "entropy", "logprob_var", "log_kurtosis", "surprise")


def token_inputs(f: TokenFeatures) -> torch.Tensor:
    """The detector's per-token statistics [..., F] from the scoring model's TokenFeatures [...]:
    log p(x_t), log rank, entropy, Var log p, log(1 + kurtosis + 3) (the kurtosis spans orders of
    magnitude) and the surprise -log p(x_t) - entropy (how much rarer the token was than the
    distribution's typical one, the quantity Fast-DetectGPT normalises)."""
    return torch.stack(
        [
            f.logprob,
            torch.log(f.rank.to(torch.float32)),
            f.entropy,
            f.var,
            torch.log1p((f.kurtosis + 3.0).clamp_min(0.0)),
            -f.logprob - f.entropy,
        ],
        dim=-1,
    ).to(torch.float32)


class PawnNet(nn.Module):
    """Gated per-token values over statistics and hidden states -> one logit per text."""

    def __init__(self, hidden_size: int, n_features: int = len(FEATURE_NAMES), width: int = 32) -> None:
        super().__init__()
        self.hidden_size, self.n_features, self.width = hidden_size, n_features, width
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.hidden_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.hidden_proj = nn.Linear(hidden_size, width)
        self.value = nn.Sequential(nn.Linear(n_features + width, width), nn.GELU(), nn.Linear(width, 1))
        self.gate = nn.Sequential(nn.Linear(width + n_features, width), nn.Tanh(), nn.Linear(width, 1))

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(self, features: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std  # [B, T, F]
        h = torch.tanh(self.hidden_proj(self.hidden_norm(hidden)))  # [B, T, W]
        joint = torch.cat([x, h], dim=-1)  # [B, T, F + W]
        values = self.value(joint)[..., 0]  # [B, T]
        # masked softmax over the tokens of each text: padding gets -1e9, not -inf (a NaN-free
        # graph even for an all-padding row, which callers never send)
        scores = self.gate(torch.cat([h, x], dim=-1))[..., 0] + (mask - 1.0) * 1e9  # [B, T]
        weights = torch.softmax(scores, dim=-1) * mask
        return (weights * values).sum(-1)  # [B]
