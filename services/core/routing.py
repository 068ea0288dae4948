"""Token routing (R2R, Fu et al., "R2R: Efficiently Navigating Divergent Reasoning Paths with
Small-Large Model Token Routing", arXiv 2505.21600; reference code thu-nics/R2R).

The small model generates; for each token it picks, a small router network estimates the
probability that the token *diverges*: that taking it instead of the large model's token would
change where the continuation goes. Tokens above a threshold are replaced by the large model's.
The router sees what the small model already computed for that position, so scoring costs one
tiny MLP per token:

* the small model's last hidden state at the position that predicted the token, [n, H];
* the embedding of the token it picked, [n, H] (its own input embedding table);
* its top-k log-probabilities at that position, sorted descending, [n, k].

These pure functions are shared by training (``specmesh train router``) and serving (the draft
service), so both build the router's inputs the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from services.core.route_cut import routed  # re-exported: training and serving cut chains alike

__all__ = ["DEFAULT_TOP_K", "DEFAULT_WIDTH", "RouterNet", "routed", "router_inputs"]

DEFAULT_TOP_K = 32  # R2R feeds the top-100 logits; 32 keeps the router's input at 2H + 32
DEFAULT_WIDTH = 256


def router_inputs(
    hidden: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor, embedding: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's three inputs for n positions, all float32.

    hidden [n, H]: the small model's final hidden state where it predicted each token;
    logits [n, C]: its logits there (C may be a truncated draft vocabulary, any order);
    token_ids [n]: the token ids it picked (full-vocabulary ids); embedding [V, H]: its input
    embedding table. Returns (hidden [n, H], token embedding [n, H], top-k log-probs [n, k]).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logprobs.shape[-1])
    top = logprobs.topk(k, dim=-1).values
    if k < top_k:  # a vocabulary smaller than k: pad with "impossible" log-probabilities
        top = torch.nn.functional.pad(top, (0, top_k - k), value=-1e4)
    return hidden.float(), embedding[token_ids.long()].float(), top


class RouterNet(nn.Module):
    """An MLP from (hidden, token embedding, top-k log-probs) to a divergence logit.

    Each input group is layer-normalised on its own first: the hidden state and the embedding
    live on different scales, and the log-probabilities on a third.
    """

    def __init__(self, hidden_size: int, top_k: int = DEFAULT_TOP_K, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.hidden_size, self.top_k, self.width = hidden_size, top_k, width
        self.norm_hidden = nn.LayerNorm(hidden_size)
        self.norm_embedding = nn.LayerNorm(hidden_size)
        self.norm_top = nn.LayerNorm(top_k)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size + top_k, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 1),
        )

    def forward(
        self, hidden: torch.Tensor, embedding: torch.Tensor, top_logprobs: torch.Tensor
    ) -> torch.Tensor:
        """[n, H], [n, H], [n, k] -> divergence logits [n]."""
        x = torch.cat(
            [self.norm_hidden(hidden), self.norm_embedding(embedding), self.norm_top(top_logprobs)], dim=-1
        )
        return self.mlp(x).squeeze(-1)
