"""The distillation loss: cross-entropy to the target's top-k, over the draft vocabulary."""

from __future__ import annotations

import torch


def sparse_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, vocab_map: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of draft logits [N, Vd] to the target's top-k distribution, renormalised over the
    ids the draft vocabulary holds (`vocab_map`: global id -> draft column or -1; None = identity).
    Equals KL(p_topk || q) up to a constant."""
    local = topk_ids.long() if vocab_map is None else vocab_map[topk_ids.long()]
    valid = local >= 0
    p = topk_logp.float().masked_fill(~valid, float("-inf")).softmax(-1)
    keep = valid.any(-1)
    logq = logits.float().log_softmax(-1).gather(-1, local.clamp(min=0))
    per_row = -(p * logq).masked_fill(~valid, 0.0).sum(-1)
    return per_row[keep].mean() if bool(keep.any()) else logits.sum() * 0.0
