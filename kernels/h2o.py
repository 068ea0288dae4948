"""H2O heavy-hitter statistics (Zhang et al., arXiv 2306.14048): accumulate attention mass per
cached key (the keep-set policy built on it is services.core.h2o.h2o_keep).

H2O scores each cached token by the attention it has received so far, summed over steps and
queries, per head; under a KV budget it keeps the top-scoring ("heavy hitter") tokens and the
most recent ones. Scores here are per KV head (a group's query heads share one cache), so the
column sums also run over the group's query heads.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def h2o_accumulate_reference(scores: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """scores [B, Hkv, K] fp32 += column sums of attn [B, H, T, K] (softmax weights; H a
    multiple of Hkv) over the T queries and each KV head's query heads. Returns scores."""
    B, H, T, K = attn.shape
    n_kv = scores.shape[1]
    scores += attn.float().reshape(B, n_kv, H // n_kv * T, K).sum(2)
    return scores


def h2o_accumulate(scores: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """h2o_accumulate_reference, through the Triton kernel where kernels.dispatch says so."""
    if use_triton(attn.device):
        from kernels.triton.h2o import h2o_accumulate_triton

        return h2o_accumulate_triton(scores, attn)
    return h2o_accumulate_reference(scores, attn)
