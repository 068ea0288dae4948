"""Per-token scores of a sequence under a model's logits (log-prob, rank, entropy, top-k)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    logprob: torch.Tensor  # [n] log p(token_i | prefix)
    rank: torch.Tensor  # [n] 1 = the argmax
    entropy: torch.Tensor  # [n] nats
    top_ids: torch.Tensor  # [n, k]
    top_logprobs: torch.Tensor  # [n, k]


def token_scores(logits: torch.Tensor, targets: torch.Tensor, top_k: int = 0) -> TokenScores:
    """logits [n, V] predict targets [n] (logits[i] is the distribution targets[i] was drawn from)."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, targets[:, None])  # [n, 1]
    rank = (logp > chosen).sum(-1) + 1
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # 0 * -inf -> 0
    top = logp.topk(top_k, dim=-1) if top_k else None
    empty = torch.empty(len(targets), 0)
    return TokenScores(
        logprob=chosen[:, 0],
        rank=rank,
        entropy=entropy,
        top_ids=top.indices if top else empty.long(),
        top_logprobs=top.values if top else empty,
    )
